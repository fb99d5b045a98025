// NF4 dequantisation (bitsandbytes' dequantize_4bit, quant_type "nf4") straight to the compute dtype: one pass over the
// packed codes instead of the dozen full-size temporaries the tensor-op path allocates. Compiled at run time by NVRTC.
// Arithmetic order and rounding match Nf4Tensor.Dequantize's tensor ops exactly (no FMA contraction), so both paths give
// bit-identical weights.

typedef unsigned short bf16;

__device__ __constant__ float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

// fp32 -> bf16, round to nearest even (as torch's conversion), NaN kept quiet.
__device__ __forceinline__ bf16 f2bf(float f)
{
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// The fp32 absmax of 64-value block b: stored as is, or (double quantisation) its 8-bit code through the signed dynamic
// map, times the code's per-256-block scale, plus the mean that was subtracted.
__device__ __forceinline__ float block_absmax(long long b, const float* absmax, const unsigned char* codes,
                                              const float* dynamic_map, const float* absmax2, float offset)
{
    if (absmax != 0) return absmax[b];
    return __fadd_rn(__fmul_rn(dynamic_map[codes[b]], absmax2[b / 256]), offset);
}

// One thread per packed byte (elements 2i, 2i+1; the first in the high nibble). n: element count.
extern "C" __global__ void nf4_dequantize_bf16(const unsigned char* packed, const float* absmax, const unsigned char* codes,
                                               const float* dynamic_map, const float* absmax2, float offset, bf16* out, long long n)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long e = 2 * i;
    if (e >= n) return;
    unsigned char byte = packed[i];
    float scale = block_absmax(e / 64, absmax, codes, dynamic_map, absmax2, offset);
    bf16 a = f2bf(__fmul_rn(NF4[byte >> 4], scale));
    if (e + 1 < n)
    {
        bf16 b = f2bf(__fmul_rn(NF4[byte & 15], scale));
        if ((((unsigned long long)(out + e)) & 3) == 0) { *(unsigned int*)(out + e) = (unsigned int)a | ((unsigned int)b << 16); return; }
        out[e + 1] = b;
    }
    out[e] = a;
}

extern "C" __global__ void nf4_dequantize_f32(const unsigned char* packed, const float* absmax, const unsigned char* codes,
                                              const float* dynamic_map, const float* absmax2, float offset, float* out, long long n)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long e = 2 * i;
    if (e >= n) return;
    unsigned char byte = packed[i];
    float scale = block_absmax(e / 64, absmax, codes, dynamic_map, absmax2, offset);
    out[e] = __fmul_rn(NF4[byte >> 4], scale);
    if (e + 1 < n) out[e + 1] = __fmul_rn(NF4[byte & 15], scale);
}
