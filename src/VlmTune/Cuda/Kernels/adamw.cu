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
