"""Dequantizing CUDA kernels for packed (store format 2) Linears, through Jittor's ``jt.code``.

Why: without them the CUDA path (plain jittor ops) dequantizes a whole packed Linear to fp32 for
every call: MOSS's fc_in is 151M weights, a 604 MB transient per call, and a GEMV that reads 8x
the bytes the int4 store holds. Here:

- decode (M <= ``GEMV_MAX_ROWS`` rows of x): one warp per output row reads that row's packed
  words once, coalesced (lane i takes words i, i+32, ...), dequantizes in registers and
  accumulates all M dot products; a warp shuffle sums the lanes. No dequantized weight exists.
- prefill: the weight is dequantized in row tiles of at most ``TILE_VALUES`` fp32 values (one
  thread per packed word) and multiplied by Jittor's matmul (cuBLAS); a tile is freed before
  the next is made, so the transient is one tile, not the layer.

Layout (``jmoss.layout.group_tensors``): row n of ``qweight`` holds K codes LSB first (int8: one
per byte; int4: code 2j in the low nibble of byte j), rows padded to 4 bytes, so a row is
``words`` little-endian uint32 words of 32/bits codes each; W[n, j] = scales[n, g] *
(code[n, j] - zeros[n, g]) with g = j // group_size in the permuted input order (x is gathered
with ``perm`` first). ``group_size`` must be a multiple of 8 so a word never spans two groups.

The arithmetic of both kernels is written once, as macros over (row, lane) and (row, word), and
also compiled for the CPU by ``jt.code``'s cpu_src with the lanes and threads as plain loops:
the tests run that CPU build against float64 numpy, so the indexing and dequantization that the
GPU executes are the ones tested. Only the launch and the warp-shuffle sum are CUDA-only. The
CUDA source is compiled by benchmarks/cuda_build_check.py (nvcc 13, sm_90 + compute_80 PTX); it
has not run on a GPU from this repository yet.
"""

from __future__ import annotations

from types import ModuleType

GEMV_MAX_ROWS = 8  # decode and small batches: the accumulators of one warp live in registers
TILE_VALUES = 1 << 24  # prefill: fp32 values of one dequantized row tile (64 MiB)

# Shared by both builds. q: uint32 words [N, words]; s, z: float32 [N, G]; x: float32 [M, K].
_COMMON = r"""
#include <cstdint>
#define JMOSS_PER_WORD (32 / JMOSS_BITS)
#define JMOSS_MASK ((1u << JMOSS_BITS) - 1u)
// Partial sums of output row n over the words lane, lane+32, ... (acc[m] for each row m of x).
#define JMOSS_GEMV_LANE(n, lane, acc) \
    for (int w = (lane); w < words; w += 32) { \
        uint32_t word = q[(size_t)(n) * words + w]; \
        int k0 = w * JMOSS_PER_WORD; \
        if (k0 >= K) break; \
        int g = k0 / group; \
        float sc = s[(size_t)(n) * G + g], zz = z[(size_t)(n) * G + g]; \
        for (int j = 0; j < JMOSS_PER_WORD && k0 + j < K; ++j) { \
            float wv = ((float)((word >> (j * JMOSS_BITS)) & JMOSS_MASK) - zz) * sc; \
            for (int m = 0; m < M; ++m) acc[m] += wv * x[(size_t)m * K + k0 + j]; \
        } \
    }
// Dequantize word w of tile row r (global row n0 + r) into dst[r, K].
#define JMOSS_DEQUANT_WORD(r, w) { \
        int n = n0 + (r); \
        uint32_t word = q[(size_t)n * words + (w)]; \
        int k0 = (w) * JMOSS_PER_WORD; \
        int g = k0 / group; \
        float sc = s[(size_t)n * G + g], zz = z[(size_t)n * G + g]; \
        for (int j = 0; j < JMOSS_PER_WORD && k0 + j < K; ++j) \
            dst[(size_t)(r) * K + k0 + j] = ((float)((word >> (j * JMOSS_BITS)) & JMOSS_MASK) - zz) * sc; \
    }
"""

_GEMV_CUDA_HEADER = _COMMON + r"""
__global__ void jmoss_qgemv(const float* __restrict__ x, const uint32_t* __restrict__ q,
                            const float* __restrict__ s, const float* __restrict__ z, float* __restrict__ y,
                            int M, int N, int K, int words, int G, int group) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (n >= N) return;  // whole warps leave together: N rows, one warp each
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    JMOSS_GEMV_LANE(n, lane, acc)
    for (int m = 0; m < M; ++m) {
        float v = acc[m];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) y[(size_t)m * N + n] = v;
    }
}
"""

_GEMV_CUDA_SRC = r"""
    int M = in0_shape0, K = in0_shape1, N = in1_shape0, words = in1_shape1 / 4, G = in2_shape1;
    int threads = 256, blocks = (N * 32 + threads - 1) / threads;
    jmoss_qgemv<<<blocks, threads>>>(in0_p, (const uint32_t*)in1_p, in2_p, in3_p, out0_p, M, N, K, words, G,
                                     (int)data["group"]);
"""

_GEMV_CPU_SRC = r"""
    int M = in0_shape0, K = in0_shape1, N = in1_shape0, words = in1_shape1 / 4, G = in2_shape1;
    int group = (int)data["group"];
    const float* x = in0_p; const uint32_t* q = (const uint32_t*)in1_p;
    const float* s = in2_p; const float* z = in3_p;
    for (int n = 0; n < N; ++n) {
        float total[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int lane = 0; lane < 32; ++lane) {  // the warp's lanes, summed as the shuffle does
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            JMOSS_GEMV_LANE(n, lane, acc)
            for (int m = 0; m < M; ++m) total[m] += acc[m];
        }
        for (int m = 0; m < M; ++m) out0_p[(size_t)m * N + n] = total[m];
    }
"""

_DEQUANT_CUDA_HEADER = _COMMON + r"""
__global__ void jmoss_dequant(const uint32_t* __restrict__ q, const float* __restrict__ s,
                              const float* __restrict__ z, float* __restrict__ dst,
                              int n0, int rows, int K, int words, int G, int group) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)rows * words) return;
    int r = (int)(t / words), w = (int)(t % words);
    if (w * JMOSS_PER_WORD >= K) return;
    JMOSS_DEQUANT_WORD(r, w)
}
"""

_DEQUANT_CUDA_SRC = r"""
    int rows = out0_shape0, K = out0_shape1, words = in0_shape1 / 4, G = in1_shape1;
    long long total = (long long)rows * words;
    int threads = 256;
    int blocks = (int)((total + threads - 1) / threads);
    jmoss_dequant<<<blocks, threads>>>((const uint32_t*)in0_p, in1_p, in2_p, out0_p, (int)data["n0"], rows, K, words, G,
                                       (int)data["group"]);
"""

_DEQUANT_CPU_SRC = r"""
    int rows = out0_shape0, K = out0_shape1, words = in0_shape1 / 4, G = in1_shape1;
    int n0 = (int)data["n0"], group = (int)data["group"];
    const uint32_t* q = (const uint32_t*)in0_p; const float* s = in1_p; const float* z = in2_p;
    float* dst = out0_p;
    for (int r = 0; r < rows; ++r)
        for (int w = 0; w < words && w * JMOSS_PER_WORD < K; ++w) JMOSS_DEQUANT_WORD(r, w)
"""


def supports(bits: int, group_size: int, row_bytes: int) -> bool:
    """Whether these kernels handle a packed weight: 4/8-bit, groups of a multiple of 8 inputs."""
    return bits in (4, 8) and group_size % 8 == 0 and row_bytes % 4 == 0


def _header(template: str, bits: int) -> str:
    return f"#define JMOSS_BITS {bits}\n" + template


def gemv(jt: ModuleType, xp, qweight, scales32, zeros32, *, bits: int, group_size: int, cuda: bool):
    """y [M, N] float32 = xp @ W.T for M <= GEMV_MAX_ROWS, dequantizing in registers.

    ``xp`` is x already gathered by ``perm`` (float32 [M, K]); scales/zeros float32 [N, G]."""
    m = int(xp.shape[0])
    if not 1 <= m <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes 1..{GEMV_MAX_ROWS} rows, got {m}")
    n_out = int(qweight.shape[0])
    options = {"data": {"group": int(group_size)}}
    if cuda:
        options.update(cuda_header=_header(_GEMV_CUDA_HEADER, bits), cuda_src=_GEMV_CUDA_SRC)
    else:
        options.update(cpu_header=_header(_COMMON, bits), cpu_src=_GEMV_CPU_SRC)
    return jt.code([m, n_out], "float32", [xp, qweight, scales32, zeros32], **options)


def dequantize_tile(jt: ModuleType, qweight, scales32, zeros32, n0: int, rows: int, k_in: int, *, bits: int,
                    group_size: int, cuda: bool):
    """float32 W[n0:n0+rows, :K] (permuted input order) from the packed rows."""
    options = {"data": {"group": int(group_size), "n0": int(n0)}}
    if cuda:
        options.update(cuda_header=_header(_DEQUANT_CUDA_HEADER, bits), cuda_src=_DEQUANT_CUDA_SRC)
    else:
        options.update(cpu_header=_header(_COMMON, bits), cpu_src=_DEQUANT_CPU_SRC)
    return jt.code([rows, k_in], "float32", [qweight, scales32, zeros32], **options)


def quant_linear(jt: ModuleType, x, perm, qweight, scales, zeros, *, bits: int, group_size: int,
                 cuda: bool | None = None):
    """x [M, K] @ W.T in float32 for a packed weight; bias and activation are the caller's.

    ``cuda`` None follows ``jt.flags.use_cuda``; False runs the same arithmetic on the CPU (tests)."""
    if cuda is None:
        cuda = bool(jt.flags.use_cuda)
    k_in, n_out = int(perm.shape[0]), int(qweight.shape[0])
    xp = x.float32()[:, perm]
    s32, z32 = scales.float32(), zeros.float32()
    m = int(xp.shape[0])
    if m <= GEMV_MAX_ROWS:
        return gemv(jt, xp, qweight, s32, z32, bits=bits, group_size=group_size, cuda=cuda)
    rows = max(1, min(n_out, TILE_VALUES // k_in))
    parts = []
    for n0 in range(0, n_out, rows):
        take = min(rows, n_out - n0)
        w = dequantize_tile(jt, qweight, s32, z32, n0, take, k_in, bits=bits, group_size=group_size, cuda=cuda)
        y = jt.nn.matmul_transpose(xp, w)
        if n0 + take < n_out:
            y.sync()  # this tile's weights are freed before the next one is made
        parts.append(y)
    return parts[0] if len(parts) == 1 else jt.concat(parts, dim=1)


def transient_bytes(k_in: int, n_out: int) -> int:
    """Largest dequantized fp32 tile quant_linear makes for a [N, K] packed Linear (prefill)."""
    return 4 * k_in * max(1, min(n_out, TILE_VALUES // k_in))
