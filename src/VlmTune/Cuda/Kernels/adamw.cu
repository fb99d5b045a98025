// Multi-tensor AdamW with gradient clipping for fp32 parameters (Training/FusedAdamW.cs): three launches per optimizer
// step for every trainable tensor together, where TorchSharp's AdamW issues about ten kernels per tensor from the host
// (2,500 for InternVL2-2B's LoRA, ~45 ms of host time a step). Compiled at run time by NVRTC.
//
// A "chunk" is up to CHUNK elements of one tensor; each block takes one chunk. Tables live in device memory:
//   grads  [T][2]  grad pointer, element count                     (the norm's tensors)
//   params [T][5]  param, grad, exp_avg, exp_avg_sq pointers, count (the update's tensors)
//   chunks [C][2]  tensor index, first element
// The arithmetic is torch.optim.AdamW's (as TorchSharp's AdamW.step writes it) in fp32, one operation per rounding:
// decoupled weight decay first, then the moments, then p += -lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
// adamw8bit_step (below) replaces adamw_step for the 8-bit block-wise states (optim: adamw_8bit).

#ifndef CHUNK
#define CHUNK 32768
#endif

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of squares of each chunk of the gradients into partials[chunk] (fixed order: deterministic).
extern "C" __global__ void grad_sumsq(const long long* grads, const long long* chunks, float* partials)
{
    long long t = chunks[2 * blockIdx.x], start = chunks[2 * blockIdx.x + 1];
    const float* g = (const float*)grads[2 * t];
    long long n = grads[2 * t + 1];
    long long end = start + CHUNK < n ? start + CHUNK : n;
    float s = 0.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) { float x = g[i]; s = fmaf(x, x, s); }
    __shared__ float warps[32];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32)
    {
        float w = threadIdx.x < (blockDim.x >> 5) ? warps[threadIdx.x] : 0.0f;
        w = warp_sum(w);
        if (threadIdx.x == 0) partials[blockIdx.x] = w;
    }
}

// One block: the global L2 norm from the partials (in double, fixed order) and libtorch's clip_grad_norm_ coefficient,
// min(max_norm / (norm + 1e-6), 1). out[0] = norm, out[1] = coefficient.
extern "C" __global__ void grad_norm_finish(const float* partials, int count, float max_norm, float* out)
{
    __shared__ double sums[1024];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += (double)partials[i];
    sums[threadIdx.x] = s;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1)
    {
        if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0)
    {
        float norm = (float)sqrt(sums[0]);
        float coef = __fdiv_rn(max_norm, __fadd_rn(norm, 1e-6f));
        out[0] = norm;
        out[1] = coef < 1.0f ? coef : 1.0f;
    }
}

// The AdamW update of every chunk, skipped entirely when the norm is not finite (the host then drops the step); the
// gradient is clipped as it is read, and zeroed after use when zero_grads is set (the optimizer's zero_grad).
// decay = 1 - lr * weight_decay, one_minus_beta* = 1 - beta*, step_size = lr / (1 - beta1^t),
// bc2_sqrt = sqrt(1 - beta2^t): each computed in double on the host and rounded once, as TorchSharp's scalars are.
extern "C" __global__ void adamw_step(const long long* params, const long long* chunks, const float* norm,
                                      float decay, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                                      float eps, float step_size, float bc2_sqrt, int zero_grads)
{
    float total = norm[0];
    if (!isfinite(total)) return;
    float coef = norm[1];
    long long t = chunks[2 * blockIdx.x], start = chunks[2 * blockIdx.x + 1];
    const long long* row = params + 5 * t;
    float* p = (float*)row[0];
    float* g = (float*)row[1];
    float* m = (float*)row[2];
    float* v = (float*)row[3];
    long long n = row[4];
    long long end = start + CHUNK < n ? start + CHUNK : n;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x)
    {
        float gi = __fmul_rn(g[i], coef);                                   // clip_grad_norm_'s in-place mul_
        float pi = __fmul_rn(p[i], decay);                                  // param.mul_(1 - lr * wd)
        float mi = fmaf(one_minus_beta1, gi, __fmul_rn(m[i], beta1));      // exp_avg.mul_(b1).add_(g, alpha: 1 - b1)
        float vi = fmaf(one_minus_beta2, __fmul_rn(gi, gi), __fmul_rn(v[i], beta2));   // exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
        float denom = __fadd_rn(__fdiv_rn(sqrtf(vi), bc2_sqrt), eps);      // (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps)
        p[i] = fmaf(-step_size, __fdiv_rn(mi, denom), pi);                 // param.addcdiv_(exp_avg, denom, -step_size)
        m[i] = mi;
        v[i] = vi;
        if (zero_grads) g[i] = 0.0f;
    }
}

// ---- 8-bit AdamW (Training/AdamW8bit.cs, FusedAdamW8bit.cs): bitsandbytes' kOptimizerStatic8bit2StateBlockwise over
// every tensor in one launch, with AdamW8bit.Step's arithmetic operation for operation (no fma contraction, IEEE
// division and square root), so that the codes, absmax and parameters equal the tensor-op reference's bit for bit.
//   params [T][7]  param, grad, state1, state2, absmax1, absmax2 pointers, element count
// A blockwise row: state1/state2 are uint8 codes of the signed / unsigned dynamic map (maps[0..255], maps[256..511]),
// absmax1/absmax2 one fp32 per QBLOCK elements. absmax1 = 0: the tensor keeps fp32 moments in state1/state2.
// Each warp takes one quantisation block (8 elements a lane), so the block's new absmax is a warp reduction.

#define QBLOCK 256

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// bitsandbytes' dQuantize<0> (non-stochastic): binary search over the sorted 256-value map, then the nearer of the
// two neighbours by the fp32 midpoint; the tensor-op reference is Nf4.DynamicMapSearch.
__device__ __forceinline__ int dynamic_code(const float* code, float x)
{
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
    for (int i = 64; i > 0; i >>= 1)
    {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
        else { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[255];
    if (lower_pivot == 0) lower = code[0];
    if (x > val) return x > __fmul_rn(__fadd_rn(upper, val), 0.5f) ? upper_pivot : pivot;
    return x < __fmul_rn(__fadd_rn(lower, val), 0.5f) ? lower_pivot : pivot;
}

// p += step_size * m / (sqrt(v) + eps_c2), then p *= decay (bitsandbytes' AdamW: the weight decay after the update).
__device__ __forceinline__ float adam8_param(float p, float m, float v, float eps_c2, float step_size, float decay)
{
    float update = __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), eps_c2));
    return __fmul_rn(__fadd_rn(p, __fmul_rn(update, step_size)), decay);
}

// Skipped entirely when the norm is not finite (the host then drops the step); the gradient is clipped as it is read
// and zeroed after use. one_minus_beta* = 1 - beta*, eps_c2 = eps * sqrt(1 - beta2^t),
// step_size = -lr * sqrt(1 - beta2^t) / (1 - beta1^t), decay = 1 - lr * weight_decay: each computed in double on the
// host and rounded once (AdamW8bit.Scalars).
extern "C" __global__ void adamw8bit_step(const long long* params, const long long* chunks, const float* norm, const float* maps,
                                          float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                                          float eps_c2, float step_size, float decay)
{
    float total = norm[0];
    if (!isfinite(total)) return;
    float coef = norm[1];
    long long t = chunks[2 * blockIdx.x], start = chunks[2 * blockIdx.x + 1];
    const long long* row = params + 7 * t;
    float* p = (float*)row[0];
    float* g = (float*)row[1];
    float* absmax1 = (float*)row[4];
    float* absmax2 = (float*)row[5];
    long long n = row[6];
    long long end = start + CHUNK < n ? start + CHUNK : n;
    if (absmax1 == 0)
    {
        float* m = (float*)row[2];
        float* v = (float*)row[3];
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x)
        {
            float gi = __fmul_rn(g[i], coef);
            float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, one_minus_beta1));
            float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, one_minus_beta2), gi));
            p[i] = adam8_param(p[i], mi, vi, eps_c2, step_size, decay);
            m[i] = mi;
            v[i] = vi;
            g[i] = 0.0f;
        }
        return;
    }

    __shared__ float code1[256], code2[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) { code1[i] = maps[i]; code2[i] = maps[256 + i]; }
    __syncthreads();
    unsigned char* c1 = (unsigned char*)row[2];
    unsigned char* c2 = (unsigned char*)row[3];
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    // CHUNK is a multiple of QBLOCK: a block never straddles two chunks; only a tensor's last block is partial.
    for (long long b0 = start + (long long)(threadIdx.x >> 5) * QBLOCK; b0 < end; b0 += (long long)warps * QBLOCK)
    {
        long long q = b0 / QBLOCK;
        float scale1 = absmax1[q], scale2 = absmax2[q];
        float m[QBLOCK / 32], v[QBLOCK / 32];
        float max1 = 0.0f, max2 = 0.0f;
#pragma unroll
        for (int j = 0; j < QBLOCK / 32; j++)
        {
            long long i = b0 + lane + 32 * j;
            m[j] = 0.0f;
            v[j] = 0.0f;
            if (i < n)
            {
                float gi = __fmul_rn(g[i], coef);
                m[j] = __fadd_rn(__fmul_rn(__fmul_rn(code1[c1[i]], scale1), beta1), __fmul_rn(gi, one_minus_beta1));
                v[j] = __fadd_rn(__fmul_rn(__fmul_rn(code2[c2[i]], scale2), beta2), __fmul_rn(__fmul_rn(gi, one_minus_beta2), gi));
                p[i] = adam8_param(p[i], m[j], v[j], eps_c2, step_size, decay);
                g[i] = 0.0f;
                max1 = fmaxf(max1, fabsf(m[j]));
                max2 = fmaxf(max2, v[j]);
            }
        }
        // Every lane has read the old absmax before these shuffles, so lane 0 may overwrite it after them.
        max1 = warp_max(max1);
        max2 = warp_max(max2);
        if (lane == 0) { absmax1[q] = max1; absmax2[q] = max2; }
        float d1 = max1 > 0.0f ? max1 : 1.0f, d2 = max2 > 0.0f ? max2 : 1.0f;   // an all-zero block keeps the zero codes
#pragma unroll
        for (int j = 0; j < QBLOCK / 32; j++)
        {
            long long i = b0 + lane + 32 * j;
            if (i < n)
            {
                int k1 = dynamic_code(code1, __fdiv_rn(m[j], d1));
                // bitsandbytes: a first-moment code of the other sign moves one step towards the moment's sign.
                if ((__float_as_uint(code1[k1]) >> 31) != (__float_as_uint(m[j]) >> 31)) k1 += m[j] > 0.0f ? 1 : -1;
                c1[i] = (unsigned char)k1;
                c2[i] = (unsigned char)dynamic_code(code2, __fdiv_rn(v[j], d2));
            }
        }
    }
}
