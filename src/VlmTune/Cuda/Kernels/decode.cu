// One decode step of InternLM2 / the Llama layout / Phi-3 (B sequences x 1 new token), bf16 storage with fp32 math.
// Compiled at run time by NVRTC (no headers: bf16 is handled as raw 16-bit patterns). Compile-time shapes:
//   HEAD_DIM  per-head size (multiple of 8, at most 256)
//   GROUPS    query heads per key/value head
//   MAXB      batch rows one GEMV block handles (accumulators per lane); larger batches use gridDim.y
//   ROWS      output rows per warp in the GEMV kernels
//   CHUNK     keys per attention split (= attention block size, 128)
//   MMA_WARPS warps of a tensor-core GEMV block
//   GEMV_UNROLL, MMA_UNROLL  k-loop unrolling of the GEMV kernels (loads in flight per lane)
// Rounding points follow the TorchSharp reference path: every op that yields a bf16 tensor there rounds here too.

typedef unsigned short bf16;

#define WARP 32
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float bf2f(bf16 v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ float lo2f(unsigned int v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi2f(unsigned int v) { return __uint_as_float(v & 0xffff0000u); }

// fp32 -> bf16, round to nearest even (as torch's conversion), NaN kept quiet.
__device__ __forceinline__ bf16 f2bf(float f)
{
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float round_bf(float f) { return bf2f(f2bf(f)); }

__device__ __forceinline__ void unpack8(uint4 v, float* f)
{
    f[0] = lo2f(v.x); f[1] = hi2f(v.x); f[2] = lo2f(v.y); f[3] = hi2f(v.y);
    f[4] = lo2f(v.z); f[5] = hi2f(v.z); f[6] = lo2f(v.w); f[7] = hi2f(v.w);
}

__device__ __forceinline__ unsigned int pack2(float a, float b)
{
    return (unsigned int)f2bf(a) | ((unsigned int)f2bf(b) << 16);
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result.
__device__ float block_sum(float v, float* scratch /* >= 32 floats */)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(t);
}

__device__ float block_max(float v, float* scratch)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(t);
}

// ---------------------------------------------------------------------------------------------------------------
// x[b, :] = table[ids[b], :]                                                  grid (B), block 256
extern "C" __global__ void embed_rows(const long long* __restrict__ ids, const bf16* __restrict__ table,
                                      bf16* __restrict__ x, int dim)
{
    int b = blockIdx.x;
    const uint4* src = (const uint4*)(table + ids[b] * (long long)dim);
    uint4* dst = (uint4*)(x + (long long)b * dim);
    for (int i = threadIdx.x; i < dim / 8; i += blockDim.x) dst[i] = src[i];
}

// RMSNorm as InternLM2 defines it: h = x·rsqrt(mean(x²)+eps) in fp32, rounded to bf16, then times the weight (bf16 op).
//                                                                              grid (B), block 256
extern "C" __global__ void rms_norm(const bf16* __restrict__ x, const bf16* __restrict__ weight,
                                    bf16* __restrict__ y, int dim, float eps)
{
    __shared__ float scratch[32];
    int b = blockIdx.x;
    const uint4* xr = (const uint4*)(x + (long long)b * dim);
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim / 8; i += blockDim.x)
    {
        float f[8]; unpack8(xr[i], f);
#pragma unroll
        for (int e = 0; e < 8; e++) ss += f[e] * f[e];
    }
    float r = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
    const uint4* wr = (const uint4*)weight;
    uint4* yr = (uint4*)(y + (long long)b * dim);
    for (int i = threadIdx.x; i < dim / 8; i += blockDim.x)
    {
        float f[8], w[8]; unpack8(xr[i], f); unpack8(wr[i], w);
        float o[8];
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = w[e] * round_bf(f[e] * r);
        yr[i] = make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// GEMV for a few rows: y[b, n] = Σ_k x[b, k] · W[n, k], fp32 accumulation. One warp computes ROWS output rows for
// MAXB batch rows; each lane streams 16-byte slices of the weight rows and reuses them for every batch row.
#define MODE_PLAIN 0
#define MODE_RESIDUAL 1   // y = bf16(residual + bf16(acc))       (residual may alias y: each element is read then written by one lane)
#define MODE_GATED 2      // y = bf16(silu(bf16(W1·x)) · bf16(W3·x)) with W3 in w_up
#define MODE_BIAS 3       // y = bf16(acc + bias[n]), bias (N) in `residual`: one rounding, as a linear layer with bias

template <int MODE>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ w_up,
                                          const bf16* residual, bf16* y, int B, int N, int K)
{
    constexpr int P = MODE == MODE_GATED ? 2 : ROWS;   // weight rows a warp streams
    constexpr int R = MODE == MODE_GATED ? 1 : ROWS;   // output rows a warp writes
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    int n0 = warp * R;
    if (n0 >= N) return;
    int b0 = blockIdx.y * MAXB;
    int nb = min(MAXB, B - b0);
    x += (long long)b0 * K;

    const bf16* rows[P];
#pragma unroll
    for (int p = 0; p < P; p++)
    {
        if (MODE == MODE_GATED) rows[p] = (p == 0 ? w : w_up) + (long long)n0 * K;
        else rows[p] = w + (long long)min(n0 + p, N - 1) * K;
    }

    float acc[P][MAXB];
#pragma unroll
    for (int p = 0; p < P; p++)
#pragma unroll
        for (int b = 0; b < MAXB; b++) acc[p][b] = 0.f;

#pragma unroll GEMV_UNROLL
    for (int k = lane * 8; k < K; k += WARP * 8)
    {
        float wf[P][8];
#pragma unroll
        for (int p = 0; p < P; p++) unpack8(__ldg((const uint4*)(rows[p] + k)), wf[p]);
#pragma unroll
        for (int b = 0; b < MAXB; b++)
        {
            if (b < nb)
            {
                float xf[8];
                unpack8(__ldg((const uint4*)(x + (long long)b * K + k)), xf);
#pragma unroll
                for (int p = 0; p < P; p++)
                {
                    float s = acc[p][b];
#pragma unroll
                    for (int e = 0; e < 8; e++) s = fmaf(wf[p][e], xf[e], s);
                    acc[p][b] = s;
                }
            }
        }
    }

#pragma unroll
    for (int b = 0; b < MAXB; b++)
    {
        if (b >= nb) break;
        long long out = (long long)(b0 + b) * N;
        if (MODE == MODE_GATED)
        {
            float g = warp_sum(acc[0][b]);
            float u = warp_sum(acc[1][b]);
            if (lane == (b & 31))
            {
                g = round_bf(g);
                float silu = round_bf(g / (1.f + expf(-g)));
                y[out + n0] = f2bf(silu * round_bf(u));
            }
        }
        else
        {
#pragma unroll
            for (int p = 0; p < P; p++)
            {
                float s = warp_sum(acc[p][b]);
                int n = n0 + p;
                if (lane == ((b + p) & 31) && n < N)
                {
                    if (MODE == MODE_RESIDUAL) y[out + n] = f2bf(bf2f(residual[out + n]) + round_bf(s));
                    else if (MODE == MODE_BIAS) y[out + n] = f2bf(s + bf2f(residual[n]));
                    else y[out + n] = f2bf(s);
                }
            }
        }
    }
}

//                                                          grid (ceil(N/ROWS/8), ceil(B/MAXB)), block 256
extern "C" __global__ void __launch_bounds__(256) gemv_plain(const bf16* x, const bf16* w, bf16* y, int B, int N, int K)
{
    gemv_body<MODE_PLAIN>(x, w, nullptr, nullptr, y, B, N, K);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bias(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int B, int N, int K)
{
    gemv_body<MODE_BIAS>(x, w, nullptr, bias, y, B, N, K);
}

extern "C" __global__ void __launch_bounds__(256) gemv_residual(const bf16* x, const bf16* w, const bf16* residual, bf16* y, int B, int N, int K)
{
    gemv_body<MODE_RESIDUAL>(x, w, nullptr, residual, y, B, N, K);
}

//                                                          grid (ceil(N/8), ceil(B/MAXB)), block 256
extern "C" __global__ void __launch_bounds__(256) gemv_gated(const bf16* x, const bf16* w_gate, const bf16* w_up, bf16* y, int B, int N, int K)
{
    gemv_body<MODE_GATED>(x, w_gate, w_up, nullptr, y, B, N, K);
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core GEMV for batches of 8..32 rows: Yᵀ (N × B) = W (N × K) · Xᵀ (K × B) with mma.sync m16n8k16 (bf16 inputs,
// fp32 accumulation). A block of MMA_WARPS warps owns one 16-row tile of W (two tiles, W1 and W3, when gated); its warps
// take turns over 32-wide k blocks and their partial sums meet in shared memory for the epilogue. Each lane loads
// 16 bytes of a weight row and of an input row at the same k: the mma's k slots only need A and B to agree on which
// k each slot holds, and both use register pair .x/.y (then .z/.w) of the same load.
#if MAXB >= 8

#define NT (MAXB / 8)

__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int MODE>
__device__ __forceinline__ void mma_body(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ w_up,
                                         const bf16* residual, bf16* y, int B, int N, int K)
{
    constexpr int T = MODE == MODE_GATED ? 2 : 1;
    __shared__ float red[MMA_WARPS][T][16][MAXB];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = blockIdx.x * 16, b0 = blockIdx.y * MAXB;
    long long ra = min(row0 + g, N - 1), rb = min(row0 + g + 8, N - 1);
    const bf16* wa[T]; const bf16* wb[T];
    wa[0] = w + ra * K; wb[0] = w + rb * K;
    if (MODE == MODE_GATED) { wa[T - 1] = w_up + ra * K; wb[T - 1] = w_up + rb * K; }
    const bf16* xs[NT]; bool xv[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
    {
        int col = b0 + nt * 8 + g;
        xv[nt] = col < B;
        xs[nt] = x + (long long)(xv[nt] ? col : 0) * K;
    }
    float acc[T][NT][4];
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[tt][nt][e] = 0.f;

#pragma unroll MMA_UNROLL
    for (int kb = warp * 32; kb < K; kb += MMA_WARPS * 32)
    {
        int k = kb + t * 8;
        uint4 A0[T], A1[T], X[NT];
#pragma unroll
        for (int tt = 0; tt < T; tt++) { A0[tt] = __ldg((const uint4*)(wa[tt] + k)); A1[tt] = __ldg((const uint4*)(wb[tt] + k)); }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) X[nt] = xv[nt] ? __ldg((const uint4*)(xs[nt] + k)) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int tt = 0; tt < T; tt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
            {
                mma_bf16(acc[tt][nt], A0[tt].x, A1[tt].x, A0[tt].y, A1[tt].y, X[nt].x, X[nt].y);
                mma_bf16(acc[tt][nt], A0[tt].z, A1[tt].z, A0[tt].w, A1[tt].w, X[nt].z, X[nt].w);
            }
    }
    // Accumulator layout: c0, c1 = (row g, cols 2t, 2t+1); c2, c3 = (row g + 8, same cols) of each 8-column tile.
#pragma unroll
    for (int tt = 0; tt < T; tt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
        {
            int c = nt * 8 + t * 2;
            red[warp][tt][g][c] = acc[tt][nt][0];
            red[warp][tt][g][c + 1] = acc[tt][nt][1];
            red[warp][tt][g + 8][c] = acc[tt][nt][2];
            red[warp][tt][g + 8][c + 1] = acc[tt][nt][3];
        }
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * MAXB; i += blockDim.x)
    {
        int r = i % 16, c = i / 16, n = row0 + r, b = b0 + c;
        if (n >= N || b >= B) continue;
        float s[T];
#pragma unroll
        for (int tt = 0; tt < T; tt++)
        {
            s[tt] = 0.f;
#pragma unroll
            for (int v = 0; v < MMA_WARPS; v++) s[tt] += red[v][tt][r][c];
        }
        long long o = (long long)b * N + n;
        if (MODE == MODE_GATED)
        {
            float gte = round_bf(s[0]);
            float silu = round_bf(gte / (1.f + expf(-gte)));
            y[o] = f2bf(silu * round_bf(s[T - 1]));
        }
        else if (MODE == MODE_RESIDUAL) y[o] = f2bf(bf2f(residual[o]) + round_bf(s[0]));
        else if (MODE == MODE_BIAS) y[o] = f2bf(s[0] + bf2f(residual[n]));
        else y[o] = f2bf(s[0]);
    }
}

//                                                          grid (ceil(N/16), ceil(B/MAXB)), block MMA_WARPS·32
extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32) mma_plain(const bf16* x, const bf16* w, bf16* y, int B, int N, int K)
{
    mma_body<MODE_PLAIN>(x, w, nullptr, nullptr, y, B, N, K);
}

extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32) mma_bias(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int B, int N, int K)
{
    mma_body<MODE_BIAS>(x, w, nullptr, bias, y, B, N, K);
}

extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32) mma_residual(const bf16* x, const bf16* w, const bf16* residual, bf16* y, int B, int N, int K)
{
    mma_body<MODE_RESIDUAL>(x, w, nullptr, residual, y, B, N, K);
}

extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32) mma_gated(const bf16* x, const bf16* w_gate, const bf16* w_up, bf16* y, int B, int N, int K)
{
    mma_body<MODE_GATED>(x, w_gate, w_up, nullptr, y, B, N, K);
}
#endif

// The step's cache column (the new key's) and key count, read by rope_append and attention_split from device memory:
// as kernel arguments they would change every step, and a captured graph could not be replayed.   grid (1), block 1
extern "C" __global__ void set_step(int* __restrict__ step, int col, int total)
{
    step[0] = col;
    step[1] = total;
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE on q and k of the packed wqkv output, and the new key/value written into the cache at column `col`.
// Layer 0's launch also records the positions in the cache's (B, capacity) table (cache_positions, else null).
// qkv row layout per KV head: [GROUPS query heads, key, value] x HEAD_DIM. cos/sin as Rotary.cs: fp32 angle
// position·inv_freq (position / linear factor first), cos/sin times cos_sin_scale in fp32 (Phi-3 longrope; else 1),
// then rounded to bf16, rotate_half pairing (i, i + d/2). The host passes the step's inv_freq table (longrope: short or
// long factors).
// With q_norm / k_norm (Qwen3; null otherwise) each query and key head is RMS-normalised over HEAD_DIM first, as
// Layers.cs RmsNorm: fp32 mean of squares, x·rsqrt(mean + eps) rounded to bf16, times the bf16 weight.
//                                                          grid (B, KVH), block (GROUPS + 2) * HEAD_DIM / 2
extern "C" __global__ void rope_append(const bf16* __restrict__ qkv, bf16* __restrict__ q_out,
                                       bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                       const long long* __restrict__ positions, long long* __restrict__ cache_positions,
                                       const float* __restrict__ inv_freq, float position_divisor, float cos_sin_scale, const int* __restrict__ step, int capacity,
                                       const bf16* __restrict__ q_norm, const bf16* __restrict__ k_norm, float norm_eps)
{
    constexpr int HALF = HEAD_DIM / 2;
    int b = blockIdx.x, kv = blockIdx.y, kvh = gridDim.y;
    int slot = threadIdx.x / HALF;          // 0..GROUPS-1: query heads, GROUPS: key, GROUPS+1: value
    int i = threadIdx.x % HALF;
    int col = step[0];                      // device memory, so that a captured graph replays every step (set_step)
    long long position = positions == nullptr ? col : positions[b];   // null: every row continues at the cache length
    if (cache_positions != nullptr && kv == 0 && threadIdx.x == 0) cache_positions[(long long)b * capacity + col] = position;
    const bf16* src = qkv + (((long long)b * kvh + kv) * (GROUPS + 2) + slot) * HEAD_DIM;
    long long cache_row = (((long long)b * kvh + kv) * capacity + col) * HEAD_DIM;
    float a = bf2f(src[i]), bh = bf2f(src[i + HALF]);
    if (q_norm != nullptr)   // the same for the whole block, so every thread reaches the barrier
    {
        __shared__ float squares[(GROUPS + 2) * HALF];
        squares[threadIdx.x] = a * a + bh * bh;
        __syncthreads();
        if (slot <= GROUPS)
        {
            float sum = 0.f;   // a fixed order: the same result in every launch
            for (int j = 0; j < HALF; j++) sum += squares[slot * HALF + j];
            float r = rsqrtf(sum / HEAD_DIM + norm_eps);
            const bf16* w = slot == GROUPS ? k_norm : q_norm;
            a = round_bf(bf2f(w[i]) * round_bf(a * r));
            bh = round_bf(bf2f(w[i + HALF]) * round_bf(bh * r));
        }
    }
    if (slot == GROUPS + 1)
    {
        v_cache[cache_row + i] = src[i];
        v_cache[cache_row + i + HALF] = src[i + HALF];
        return;
    }
    float t = (float)position;
    if (position_divisor != 1.f) t = t / position_divisor;
    float angle = t * inv_freq[i];
    float c = cosf(angle), s = sinf(angle);
    if (cos_sin_scale != 1.f) { c *= cos_sin_scale; s *= cos_sin_scale; }
    c = round_bf(c); s = round_bf(s);
    bf16 lo = f2bf(round_bf(a * c) + round_bf(-bh * s));   // x·cos + rotate_half(x)·sin, each product a bf16 op
    bf16 hi = f2bf(round_bf(bh * c) + round_bf(a * s));
    if (slot == GROUPS)
    {
        k_cache[cache_row + i] = lo;
        k_cache[cache_row + i + HALF] = hi;
    }
    else
    {
        bf16* dst = q_out + ((long long)b * kvh * GROUPS + kv * GROUPS + slot) * HEAD_DIM;
        dst[i] = lo;
        dst[i + HALF] = hi;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Flash-decoding, split pass: one block per (split of CHUNK keys, KV head, row). The KV head's GROUPS query heads
// share each key/value load. Columns [first[b], total) are valid for row b (left padding before first[b]).
// Writes the split's unnormalised output, running max and sum (fp32) for the combine pass. A head of DV 16-byte
// slices where DV is not a power of two (Phi-3's head_dim 96: 12) leaves lanes idle: DV_LANES of a warp share one key
// in the score pass (the shuffle tree needs a power of two), and the PV pass uses KEY_LANES·DV of the CHUNK threads.
//                                                          grid (splits, KVH, B), block CHUNK (= 128)
extern "C" __global__ void __launch_bounds__(CHUNK) attention_split(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ first, float* __restrict__ part_o, float* __restrict__ part_ml,
    const int* __restrict__ step, int capacity, float scale)
{
    constexpr int DV = HEAD_DIM / 8;        // 16-byte slices per head vector
    constexpr int DV_LANES = DV <= 1 ? 1 : DV <= 2 ? 2 : DV <= 4 ? 4 : DV <= 8 ? 8 : DV <= 16 ? 16 : 32;   // DV rounded up to a power of two
    constexpr int KEY_LANES = CHUNK / DV;   // keys processed side by side in the PV pass
    static_assert(DV <= WARP, "HEAD_DIM at most 256");
    __shared__ float qs[GROUPS][HEAD_DIM];
    __shared__ float probs[GROUPS][CHUNK];
    __shared__ float scratch[32];
    __shared__ float reduce[KEY_LANES][GROUPS][HEAD_DIM];

    int split = blockIdx.x, kv = blockIdx.y, b = blockIdx.z, kvh = gridDim.y, splits = gridDim.x;
    int tid = threadIdx.x;
    int total = step[1];                    // keys cached, the new one included (set_step)
    int begin = max(split * CHUNK, first == nullptr ? 0 : first[b]);
    int end = min(split * CHUNK + CHUNK, total);

    const bf16* qb = q + ((long long)b * kvh * GROUPS + kv * GROUPS) * HEAD_DIM;
    for (int i = tid; i < GROUPS * HEAD_DIM; i += CHUNK) qs[i / HEAD_DIM][i % HEAD_DIM] = bf2f(qb[i]);
    __syncthreads();

    long long head = ((long long)b * kvh + kv) * capacity;

    // Scores: DV_LANES lanes share one key (DV of them one 16-byte slice each, so a warp reads whole key rows,
    // coalesced), the query slices sit in registers, and the partial dot products meet by shuffles within the group.
    {
        constexpr int KEYS_PER_WARP = WARP / DV_LANES;
        constexpr int WARPS = CHUNK / WARP;
        int warp = tid / WARP, lane = tid % WARP, sub = lane / DV_LANES, dl = lane % DV_LANES;
        bool slice = dl < DV;               // false: a padding lane, which adds zeros to the shuffle tree
        float qr[GROUPS][8];
#pragma unroll
        for (int g = 0; g < GROUPS; g++)
#pragma unroll
            for (int e = 0; e < 8; e++) qr[g][e] = 0.f;
        if (slice)
        {
#pragma unroll
            for (int g = 0; g < GROUPS; g++)
#pragma unroll
                for (int e = 0; e < 8; e++) qr[g][e] = qs[g][dl * 8 + e];
        }
#pragma unroll 4
        for (int jj = warp * KEYS_PER_WARP + sub; jj < CHUNK; jj += WARPS * KEYS_PER_WARP)
        {
            int jk = split * CHUNK + jj;
            bool ok = jk >= begin && jk < end;
            float dot[GROUPS];
#pragma unroll
            for (int g = 0; g < GROUPS; g++) dot[g] = 0.f;
            if (ok && slice)
            {
                float kf[8]; unpack8(__ldg((const uint4*)(k_cache + (head + jk) * HEAD_DIM) + dl), kf);
#pragma unroll
                for (int g = 0; g < GROUPS; g++)
#pragma unroll
                    for (int e = 0; e < 8; e++) dot[g] = fmaf(qr[g][e], kf[e], dot[g]);
            }
#pragma unroll
            for (int o = DV_LANES / 2; o > 0; o >>= 1)
#pragma unroll
                for (int g = 0; g < GROUPS; g++) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
            if (dl == 0)
#pragma unroll
                for (int g = 0; g < GROUPS; g++) probs[g][jj] = ok ? dot[g] * scale : -INFINITY;
        }
    }
    __syncthreads();
    int j = split * CHUNK + tid;
    bool valid = j >= begin && j < end;
    float s[GROUPS];
#pragma unroll
    for (int g = 0; g < GROUPS; g++) s[g] = probs[g][tid];
    __syncthreads();   // probs is overwritten with probabilities below

    float m[GROUPS], l[GROUPS];
#pragma unroll
    for (int g = 0; g < GROUPS; g++)
    {
        m[g] = block_max(s[g], scratch);
        float p = valid ? expf(s[g] - m[g]) : 0.f;
        probs[g][tid] = p;
        l[g] = block_sum(p, scratch);
    }
    __syncthreads();

    // PV: thread = (key lane, 16-byte slice of the head dim); threads past KEY_LANES·DV have no key lane.
    int dv = tid % DV, lane_k = tid / DV;
    if (lane_k < KEY_LANES)
    {
        float o[GROUPS][8];
#pragma unroll
        for (int g = 0; g < GROUPS; g++)
#pragma unroll
            for (int e = 0; e < 8; e++) o[g][e] = 0.f;
        for (int jj = lane_k; jj < CHUNK; jj += KEY_LANES)
        {
            int jk = split * CHUNK + jj;
            if (jk < begin || jk >= end) continue;
            float vf[8]; unpack8(__ldg((const uint4*)(v_cache + (head + jk) * HEAD_DIM) + dv), vf);
#pragma unroll
            for (int g = 0; g < GROUPS; g++)
            {
                float p = probs[g][jj];
#pragma unroll
                for (int e = 0; e < 8; e++) o[g][e] = fmaf(p, vf[e], o[g][e]);
            }
        }
#pragma unroll
        for (int g = 0; g < GROUPS; g++)
#pragma unroll
            for (int e = 0; e < 8; e++) reduce[lane_k][g][dv * 8 + e] = o[g][e];
    }
    __syncthreads();

    for (int i = tid; i < GROUPS * HEAD_DIM; i += CHUNK)
    {
        int g = i / HEAD_DIM, d = i % HEAD_DIM;
        float sum = 0.f;
#pragma unroll
        for (int r = 0; r < KEY_LANES; r++) sum += reduce[r][g][d];
        long long h = (long long)b * kvh * GROUPS + kv * GROUPS + g;
        part_o[(h * splits + split) * HEAD_DIM + d] = sum;
    }
#pragma unroll
    for (int g = 0; g < GROUPS; g++)
        if (tid == g)
        {
            long long h = (long long)b * kvh * GROUPS + kv * GROUPS + g;
            part_ml[(h * splits + split) * 2] = m[g];
            part_ml[(h * splits + split) * 2 + 1] = l[g];
        }
}

// Combine pass: out[b, h·HEAD_DIM + d] = Σ_s e^(m_s − M) o_s[d] / Σ_s e^(m_s − M) l_s, rounded to bf16.
//                                                          grid (H, B), block HEAD_DIM
extern "C" __global__ void attention_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                             bf16* __restrict__ out, int splits)
{
    int h = blockIdx.x, b = blockIdx.y, heads = gridDim.x, d = threadIdx.x;
    long long row = (long long)b * heads + h;
    const float* ml = part_ml + row * splits * 2;
    float M = -INFINITY;
    for (int s = 0; s < splits; s++) M = fmaxf(M, ml[s * 2]);
    float L = 0.f, acc = 0.f;
    for (int s = 0; s < splits; s++)
    {
        float ms = ml[s * 2];
        if (ms == -INFINITY) continue;      // a split with no valid key
        float w = expf(ms - M);
        L += w * ml[s * 2 + 1];
        acc += w * part_o[(row * splits + s) * HEAD_DIM + d];
    }
    out[row * HEAD_DIM + d] = f2bf(acc / L);
}

// ---------------------------------------------------------------------------------------------------------------
// Greedy pick: ids[b] = argmax_v logits[b, v], the first index on ties (as torch.argmax).
//                                                          grid (B), block 1024
extern "C" __global__ void argmax_rows(const bf16* __restrict__ logits, long long* __restrict__ ids, int vocab)
{
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    int b = blockIdx.x, tid = threadIdx.x;
    const bf16* row = logits + (long long)b * vocab;
    float bv = -INFINITY; int bi = 0x7fffffff;
    for (int v = tid; v < vocab; v += blockDim.x)
    {
        float f = bf2f(row[v]);
        if (f > bv || (f != f && bv == bv)) { bv = f; bi = v; }   // NaN wins, as in torch
    }
    best_v[tid] = bv; best_i[tid] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1)
    {
        if (tid < stride)
        {
            float ov = best_v[tid + stride]; int oi = best_i[tid + stride];
            float cv = best_v[tid]; int ci = best_i[tid];
            bool take = (ov > cv) || (ov == cv && oi < ci) || (ov != ov && (cv == cv || oi < ci));
            if (take) { best_v[tid] = ov; best_i[tid] = oi; }
        }
        __syncthreads();
    }
    if (tid == 0) ids[b] = best_i[0] == 0x7fffffff ? 0 : best_i[0];
}
