// jmoss CPU kernels: y[M,N] = act(x[M,K] . W[N,K]^T + b[N]) with fp16 or fp32 weights.
//
// This text is handed to jt.code as `cpu_header` by kernels/cpu.py (it is read as a string, so
// the kernel cache key follows its content). Jittor compiles it with `-march=native -fopenmp
// -Ofast`, so the ISA path is chosen at compile time from the predefined macros:
//
//   avx512   __AVX512F__ (16 lanes; the K % 16 tail is scalar on every path)
//   avx2     __AVX2__ && __FMA__ && __F16C__
//   portable anything else, or JMOSS_FORCE_PORTABLE defined (tests check both paths agree)
//   (JMOSS_FORCE_AVX2 picks the avx2 path on an AVX-512 CPU, so tests cover it there too)
//
// Why the shape of the code: batch-1 decode is a stream of GEMVs whose cost is reading W once, so
// the GEMV path must run at memory speed: threads take 32-row chunks of W (long sequential
// runs, software-prefetched), four rows at a time share each load of x, fp16 is widened with
// vcvtph2ps straight into FMAs, and accumulation is fp32. Small M (2-3 rows) uses the same
// dot-product micro-kernel with up to 4x4 register tiles; prefill (M >= GEMM_MIN_M) the
// outer-product GEMM of gemm_panels (fp32 weight panels per thread, x packed transposed).
// Nothing is allocated here: the output buffer is jittor's, everything else is
// registers. Bias and gelu_new are applied in a per-chunk epilogue over contiguous output rows,
// where the compiler vectorises expf.
//
// Identifiers must avoid `out` and the `@` character: jittor's code-op template #defines `out`
// and expands `@` macros around this header.
// Jittor splices its JIT #defines in after the last #include line of the file, so the
// conditional include comes first and the list ends with unconditional ones.
#if !defined(JMOSS_FORCE_PORTABLE) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)))
#include <immintrin.h>
#endif
#if !defined(JMOSS_FORCE_PORTABLE) && defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <cstdint>
#include <cstring>
#include <vector>
#include <cmath>
#include <algorithm>
#include <type_traits>
#include <limits>
#include <omp.h>
#include "type/fp16_compute.h"  // jittor::float16, the element type jittor hands us for fp16 Vars

#if defined(JMOSS_FORCE_PORTABLE)
#define JMOSS_ISA 0
#elif defined(JMOSS_FORCE_AVX2) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JMOSS_ISA 1  // tests run the AVX2 code on an AVX-512 CPU too (the compiler may still use EVEX encodings)
#elif defined(__AVX512F__)
#define JMOSS_ISA 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JMOSS_ISA 1
#else
#define JMOSS_ISA 0
#endif

// AMX-BF16 prefill path: compiled in where -march=native offers AMX (Sapphire Rapids and later),
// and taken at run time only if Linux grants the tile state (see amx_ready) and the caller asks.
#if JMOSS_ISA == 2 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define JMOSS_AMX 1
#else
#define JMOSS_AMX 0
#endif

namespace jmoss_k {

typedef int64_t i64;

// The first 64-byte aligned address of a scratch vector grown to hold n elements past it.
template <class T>
static inline T* aligned64(std::vector<T>& v, i64 n) {
    const i64 need = n + (i64)(64 / sizeof(T));
    if ((i64)v.size() < need) v.resize(need);
    const uintptr_t a = (reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63);
    return reinterpret_cast<T*>(a);
}

// IEEE half -> float without any instruction-set help (portable path, tails, bias).
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
            man &= 0x3ffu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline float scalar_load(const float* p) { return *p; }
static inline float scalar_load(const uint16_t* p) {
#if JMOSS_ISA >= 1
    return _cvtsh_ss(*p);
#else
    return half_to_float(*p);
#endif
}

// ------------------------------------------------------------------------------------------
// Vector loads: widen one vector of weights (fp16 or fp32) to fp32 lanes.
#if JMOSS_ISA == 2
typedef __m512 vec;
static const int VW = 16;
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif JMOSS_ISA == 1
typedef __m256 vec;
static const int VW = 8;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if JMOSS_ISA >= 1
// Dot products of MR rows of x with NR rows of W over k in [0, K): acc[i][j] = x_i . w_j.
// Full vectors in the main loop; the K % VW tail is scalar (correct for any K, and cheap: at
// most VW-1 elements per row pair).
template <int MR, int NR, class WT>
static inline void tile_dot(const float* x, i64 ldx, const WT* w, i64 ldw, i64 K, float acc[MR][NR]) {
    vec a[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) a[i][j] = vzero();
    const i64 Kv = K - K % VW;
    for (i64 k = 0; k < Kv; k += VW) {
        if (MR == 1) {
            // Decode streams each weight row once: ask for it ~2-4 KiB ahead so the NR row
            // streams keep enough misses in flight (measured +5-15% GB/s over the hardware
            // prefetcher alone on this 2-core VM). Prefetching past the end is harmless.
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++) _mm_prefetch((const char*)(w + j * ldw + k + 1024), _MM_HINT_T0);
        }
        vec wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) wv[j] = vload(w + j * ldw + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            vec xv = vload(x + i * ldx + k);
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++) a[i][j] = vfma(xv, wv[j], a[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = vsum(a[i][j]);
            for (i64 k = Kv; k < K; k++) s += x[i * ldx + k] * scalar_load(w + j * ldw + k);
            acc[i][j] = s;
        }
}
#else
template <int MR, int NR, class WT>
static inline void tile_dot(const float* x, i64 ldx, const WT* w, i64 ldw, i64 K, float acc[MR][NR]) {
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = 0.f;
    for (i64 k = 0; k < K; k++) {
        float wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = scalar_load(w + j * ldw + k);
        for (int i = 0; i < MR; i++) {
            float xv = x[i * ldx + k];
            for (int j = 0; j < NR; j++) acc[i][j] += xv * wv[j];
        }
    }
}
#endif

template <int MR, int NR, class WT>
static inline void tile_store(const float* x, const WT* w, float* y, i64 m0, i64 n0, i64 K, i64 N) {
    float acc[MR][NR];
    tile_dot<MR, NR>(x + m0 * K, K, w + n0 * K, K, K, acc);
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(m0 + i) * N + n0 + j] = acc[i][j];
}

// Remainder tiles (M % 4 rows of x, N % 4 rows of W) dispatched to fixed-size instantiations so
// accumulators stay in registers.
template <int MR, class WT>
static inline void tile_nr(const float* x, const WT* w, float* y, i64 m0, i64 n0, int nr, i64 K, i64 N) {
    switch (nr) {
        case 4: tile_store<MR, 4>(x, w, y, m0, n0, K, N); break;
        case 3: tile_store<MR, 3>(x, w, y, m0, n0, K, N); break;
        case 2: tile_store<MR, 2>(x, w, y, m0, n0, K, N); break;
        default: tile_store<MR, 1>(x, w, y, m0, n0, K, N); break;
    }
}

template <class WT>
static inline void tile_any(const float* x, const WT* w, float* y, i64 m0, int mr, i64 n0, int nr, i64 K, i64 N) {
    switch (mr) {
        case 4: tile_nr<4>(x, w, y, m0, n0, nr, K, N); break;
        case 3: tile_nr<3>(x, w, y, m0, n0, nr, K, N); break;
        case 2: tile_nr<2>(x, w, y, m0, n0, nr, K, N); break;
        default: tile_nr<1>(x, w, y, m0, n0, nr, K, N); break;
    }
}

static inline float gelu_new(float v) {
    // 0.5*v*(1+tanh(u)) == v * sigmoid(2u) == v / (1 + exp(-2u)); one expf, vectorisable.
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    float u = c * (v + 0.044715f * v * v * v);
    // -Ofast assumes no infinities, so keep expf finite; tanh(20) == 1 in fp32 anyway.
    u = std::min(20.0f, std::max(-20.0f, u));
    return v / (1.0f + expf(-2.0f * u));
}

#if JMOSS_ISA == 2
// gelu_new on 16 lanes with the same formula and clamp. glibc's expf is not vectorised at -O2
// (libmvec needs -ffast-math), and the scalar call cost ~8 ns per element: 20% of a CodeGen-350M
// prefill. exp(t) = 2^n * e^r, n = round(t / ln 2), |r| <= ln2 / 2, e^r by its degree-7 Taylor
// polynomial (truncation < 6e-9 relative), 2^n applied exactly by scalef. Used for |t| <= 87
// (gelu: |t| <= 40; softmax numerators: [-87, 0]), where n stays within fp32's exponent range.
static inline __m512 vexp_bounded(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.4426950408889634f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);  // ln 2 = hi + lo (Cody-Waite)
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 gelu_new16(__m512 v) {
    const __m512 c = _mm512_set1_ps(0.7978845608028654f);
    __m512 u = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
    u = _mm512_min_ps(_mm512_set1_ps(20.0f), _mm512_max_ps(_mm512_set1_ps(-20.0f), u));
    const __m512 e = vexp_bounded(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#endif

// gelu_new over n contiguous floats in place.
static inline void gelu_row(float* row, i64 n) {
    i64 i = 0;
#if JMOSS_ISA == 2
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(row + i, gelu_new16(_mm512_loadu_ps(row + i)));
    if (i < n) {
        const __mmask16 keep = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(row + i, keep, gelu_new16(_mm512_maskz_loadu_ps(keep, row + i)));
        return;
    }
#endif
    for (; i < n; i++) row[i] = gelu_new(row[i]);
}


#if JMOSS_ISA >= 1
// ------------------------------------------------------------------------------------------
// Prefill GEMM, register-blocked outer products over fp32 weight panels (fp16 and packed weights).
//
// The dot-product tile above reduces along K and needs a load of W and of x for every FMA pair;
// here a thread turns PR = GEMM_PR rows of W into an fp32 row-major panel (fp16 widened, packed
// codes dequantized: make_panel), and every 2-vector block of x rows, packed transposed as
// [K][2 VW] (xt), sweeps it: per k, two vector loads of x^T and PR broadcasts of panel values
// feed 2 PR FMAs into 2 PR accumulators (24 of AVX-512's 32 registers, 12 of AVX2's 16). The
// panel (PR * K * 4 bytes, <= 192 KiB at K = 4096) and the slab of x^T (<= GEMM_XT_BYTES) stay in
// L2; a weight is converted once per slab, so no copy of the layer ever exists. Bias and gelu_new
// are applied to the accumulators before they are written out.
#if JMOSS_ISA == 2
static const int GEMM_PR = 12;
#else
static const int GEMM_PR = 6;
#endif
static const i64 GEMM_MB = 2 * VW;  // x rows per register tile
// Fewer x rows take the dot-product tiles: a 16-lane block of x rows is then mostly padding (measured,
// M rows, fp16 layer, new/old: M = 4 0.36x, 8 0.52x, 16 0.77x, 64 1.09x; packed: 8 0.81x, 16 1.43x).
static const i64 GEMM_MIN_M = 32;
static const i64 QUANT_GEMM_MIN_M = 16;
#ifndef JMOSS_GEMM_XT_BYTES
#define JMOSS_GEMM_XT_BYTES (1024 * 1024)
#endif
static const i64 GEMM_XT_BYTES = JMOSS_GEMM_XT_BYTES;  // x^T slab budget (L2: 1 MiB per core here)

static inline vec vbcast(const float* p) {
#if JMOSS_ISA == 2
    return _mm512_set1_ps(*p);
#else
    return _mm256_broadcast_ss(p);
#endif
}
static inline vec vbroadcast1(float v) {
#if JMOSS_ISA == 2
    return _mm512_set1_ps(v);
#else
    return _mm256_set1_ps(v);
#endif
}
static inline vec vadd(vec a, vec b) {
#if JMOSS_ISA == 2
    return _mm512_add_ps(a, b);
#else
    return _mm256_add_ps(a, b);
#endif
}
static inline void vstore(float* p, vec v) {
#if JMOSS_ISA == 2
    _mm512_storeu_ps(p, v);
#else
    _mm256_storeu_ps(p, v);
#endif
}

// rows (<= GEMM_MB) x rows starting at m0, columns read through perm (or in order), into xt as
// [K][GEMM_MB], zeros past the real rows.
static inline void pack_xt_block(const float* x, const int32_t* perm, i64 K, i64 m0, i64 rows, i64 k0, i64 k1,
                                 float* xt) {
    for (i64 k = k0; k < k1; k++) {
        const i64 src = perm ? perm[k] : k;
        float* d = xt + k * GEMM_MB;
        i64 i = 0;
        for (; i < rows; i++) d[i] = x[(m0 + i) * K + src];
        for (; i < GEMM_MB; i++) d[i] = 0.f;
    }
}

// acc[r][v] = sum_k panel[r][k] * xt[k][v VW + lane] for PR rows of the panel and NV vectors of x^T.
template <int PR, int NV, class BT>
static inline void gemm_tile(const float* panel, const float* xt, i64 K, const BT* bias, int act, float* y, i64 N,
                             i64 m0, i64 mrows, i64 n0) {
    // jittor compiles at -O2, which keeps a loop-indexed accumulator array in memory unless the
    // loops are unrolled by hand (measured: 24 accumulators spilled, half the FMA rate).
    vec a[PR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < PR; r++)
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) a[r][v] = vzero();
    const float* pr = panel;
    for (i64 k = 0; k < K; k++) {
        vec xv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) xv[v] = vload(xt + k * GEMM_MB + v * VW);
#pragma GCC unroll 16
        for (int r = 0; r < PR; r++) {
            const vec wb = vbcast(pr + r * K + k);
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++) a[r][v] = vfma(wb, xv[v], a[r][v]);
        }
    }
    // Epilogue: bias (and gelu_new on AVX-512) on the vectors, then a transposed write of mrows x PR.
    alignas(64) float tmp[PR][NV * VW];
#pragma GCC unroll 16
    for (int r = 0; r < PR; r++) {
        const vec bv = vbroadcast1(bias ? scalar_load(bias + n0 + r) : 0.f);
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) {
            vec t = vadd(a[r][v], bv);
#if JMOSS_ISA == 2
            if (act == 1) t = gelu_new16(t);
#endif
            vstore(&tmp[r][v * VW], t);
        }
    }
    for (i64 i = 0; i < mrows; i++) {
        float* yr = y + (m0 + i) * N + n0;
        for (int r = 0; r < PR; r++) {
#if JMOSS_ISA == 2
            yr[r] = tmp[r][i];
#else
            yr[r] = act == 1 ? gelu_new(tmp[r][i]) : tmp[r][i];
#endif
        }
    }
}

template <int NV, class BT>
static inline void gemm_tile_rows(int pr, const float* panel, const float* xt, i64 K, const BT* bias, int act,
                                  float* y, i64 N, i64 m0, i64 mrows, i64 n0) {
    switch (pr) {
#define JMOSS_GEMM_CASE(R) \
        case R: gemm_tile<R, NV>(panel, xt, K, bias, act, y, N, m0, mrows, n0); break;
        JMOSS_GEMM_CASE(1) JMOSS_GEMM_CASE(2) JMOSS_GEMM_CASE(3) JMOSS_GEMM_CASE(4) JMOSS_GEMM_CASE(5)
#if JMOSS_ISA == 2
        JMOSS_GEMM_CASE(6) JMOSS_GEMM_CASE(7) JMOSS_GEMM_CASE(8) JMOSS_GEMM_CASE(9) JMOSS_GEMM_CASE(10)
        JMOSS_GEMM_CASE(11)
#endif
#undef JMOSS_GEMM_CASE
        default: gemm_tile<GEMM_PR, NV>(panel, xt, K, bias, act, y, N, m0, mrows, n0); break;
    }
}

// y[M, N] = act(x[M, K] (columns through perm if given) . W^T + bias), W given by
// make_panel(n0, rows, dst): rows rows of W from n0 as fp32 [rows][K] at dst.
template <class MakePanel, class BT>
static void gemm_panels(const float* x, const int32_t* perm, const BT* bias, float* y, i64 M, i64 K, i64 N,
                        int threads, int act, const MakePanel& make_panel) {
    const i64 npanels = (N + GEMM_PR - 1) / GEMM_PR;
    if (threads < 1) threads = 1;
    if (threads > npanels) threads = (int)std::max<i64>(1, npanels);
    const i64 slab_blocks = std::max<i64>(1, GEMM_XT_BYTES / (4 * GEMM_MB * std::max<i64>(K, 1)));
    const i64 slab = slab_blocks * GEMM_MB;
    static thread_local std::vector<float> xt_buf;
    const i64 xt_elems = std::min<i64>(slab, (M + GEMM_MB - 1) / GEMM_MB * GEMM_MB) * K;
    float* xt = aligned64(xt_buf, xt_elems);  // its 64-byte loads stay within one line each
    for (i64 s0 = 0; s0 < M; s0 += slab) {
        const i64 srows = std::min(slab, M - s0), nblocks = (srows + GEMM_MB - 1) / GEMM_MB;
#pragma omp parallel num_threads(threads)
        {
            static thread_local std::vector<float> panel_buf;
            float* panel = aligned64(panel_buf, GEMM_PR * K);
            const i64 KC = 256, kchunks = (K + KC - 1) / KC;
#pragma omp for schedule(static) collapse(2)
            for (i64 b = 0; b < nblocks; b++)
                for (i64 kc = 0; kc < kchunks; kc++)
                    pack_xt_block(x, perm, K, s0 + b * GEMM_MB, std::min<i64>(GEMM_MB, srows - b * GEMM_MB), kc * KC,
                                  std::min(K, kc * KC + KC), xt + b * GEMM_MB * K);
            // implicit barrier: x^T is packed before any panel reads it
#pragma omp for schedule(dynamic, 1)
            for (i64 p = 0; p < npanels; p++) {
                const i64 n0 = p * GEMM_PR;
                const int pr = (int)std::min<i64>(GEMM_PR, N - n0);
                make_panel(n0, pr, panel);
                for (i64 b = 0; b < nblocks; b++) {
                    const i64 m0 = b * GEMM_MB, mrows = std::min<i64>(GEMM_MB, srows - m0);
                    if (mrows > VW)
                        gemm_tile_rows<2>(pr, panel, xt + b * GEMM_MB * K, K, bias, act, y + s0 * N, N, m0, mrows, n0);
                    else
                        gemm_tile_rows<1>(pr, panel, xt + b * GEMM_MB * K, K, bias, act, y + s0 * N, N, m0, mrows, n0);
                }
            }
        }
    }
}

// fp16/fp32 weight rows widened into a panel.
template <class WT>
struct widen_panel {
    const WT* w;
    i64 K;
    void operator()(i64 n0, int rows, float* dst) const {
        const i64 Kv = K - K % VW;
        for (int r = 0; r < rows; r++) {
            const WT* src = w + (n0 + r) * K;
            float* d = dst + r * K;
            for (i64 k = 0; k < Kv; k += VW) vstore(d + k, vload(src + k));
            for (i64 k = Kv; k < K; k++) d[k] = scalar_load(src + k);
        }
    }
};
#endif

#if JMOSS_AMX
// ------------------------------------------------------------------------------------------
// Prefill GEMM on AMX tiles, "bf16x3": fp32-class accuracy from bf16 tile multiplies.
//
// Every fp16 weight is split exactly into two bf16 halves, w = wh + wl (fp16's 11-bit significand
// fits in bf16's 8 + 8), and every fp32 activation into x = xh + xl + e, |xl| <= 2^-8 |x|,
// |e| <= 2^-16 |x|. y = sum wh*xh + wl*xh + wh*xl, every product exact in the tile unit and
// accumulated in fp32; the error per product is wl*xl + w*e, <= 2 * 2^-16 |w x| (3 * 2^-16 for fp32
// weights, which also split with a 2^-16 residual). That is fp32-class: ~4e-6 of max|y| measured.
//
// Roles are swapped so that W needs no transpose: A tiles are 16 rows of W (bf16, [n][k] as W is
// stored, packed tile by tile), B tiles are x^T in the VNNI pair layout, C tiles are 16 n x 16 m
// (y^T blocks, turned back by a gather in the epilogue). x is split/packed once per call (M x K,
// small). Each thread takes 16- or 32-row panels of W in chunks; while the tiles multiply one
// panel, the core splits the next panel's weights into bf16 (split_slice), so W streams from
// memory once and is never held as anything but fp16 outside two small per-thread buffers.
//
// What bounds it on the 2-core SPR VM (measured with perf and a standalone harness): the tile
// work (TDPBF16PS ~5.5 ns; tile loads 3-7 ns each, and a load waits for the products still
// reading its tile) is about half the time; the fp16 split (~0.13 ns per weight in cache) and the
// weight stream do not overlap the tile unit on one core and make up most of the rest.

static inline bool amx_ready() {
    // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): process-wide, asked once. Any
    // failure (old kernel, a VM without the state) sends every call down the AVX-512 path.
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : 0;
    return state == 1;
}

// Round-to-nearest-even to bf16, kept as fp32 bit patterns with the low half zeroed.
static inline __m512i bf16_bits(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    return _mm512_and_si512(b, _mm512_set1_epi32((int)0xffff0000u));
}

static inline void split16(__m512 v, uint16_t* hi, uint16_t* lo) {
#if defined(__AVX512BF16__)
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);  // RNE, same as bf16_bits
    __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm256_storeu_si256((__m256i*)hi, h);
    _mm256_storeu_si256((__m256i*)lo, (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
#else
    __m512i hb = bf16_bits(v);
    __m512i lb = bf16_bits(_mm512_sub_ps(v, _mm512_castsi512_ps(hb)));
    _mm256_storeu_si256((__m256i*)hi, _mm512_cvtepi32_epi16(_mm512_srli_epi32(hb, 16)));
    _mm256_storeu_si256((__m256i*)lo, _mm512_cvtepi32_epi16(_mm512_srli_epi32(lb, 16)));
#endif
}

// 32 fp16 weights into bf16 halves. fp16's 11-bit significand splits exactly into its top 8 bits,
// rounded half away from zero (add half an ulp to the bit pattern, mask), and the signed remainder
// of at most 3 bits: both exact bf16 values, so one two-register bf16 conversion per half packs
// them with no rounding -- about half the instructions of split16. (Rounding, not truncating,
// keeps |lo| within half a bf16 ulp, <= 2^-8 |w|, which bounds the dropped lo*lo product;
// measured: truncation doubles the GEMM's error.)
static inline __m512 bf16_round_half_up(__m512 f) {
    const __m512i b = _mm512_add_epi32(_mm512_castps_si512(f), _mm512_set1_epi32(0x8000));
    return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline void split32(const uint16_t* src, uint16_t* hi, uint16_t* lo) {
#if defined(__AVX512BF16__)
    const __m512 f0 = vload(src), f1 = vload(src + 16);
    const __m512 h0 = bf16_round_half_up(f0), h1 = bf16_round_half_up(f1);
    _mm512_storeu_si512((void*)hi, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
    _mm512_storeu_si512((void*)lo, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(f1, h1), _mm512_sub_ps(f0, h0)));
#else
    split16(vload(src), hi, lo);
    split16(vload(src + 16), hi + 16, lo + 16);
#endif
}

static inline void split32(const float* src, uint16_t* hi, uint16_t* lo) {
    split16(vload(src), hi, lo);
    split16(vload(src + 16), hi + 16, lo + 16);
}

// The 32 columns [k0, k0 + 32) of a row, split like split_row (zeros past K), to hi[0..32), lo[0..32).
template <class WT>
static inline void split_slice(const WT* src, i64 k0, i64 K, uint16_t* hi, uint16_t* lo) {
    if (k0 + 32 <= K) {
        split32(src + k0, hi, lo);
        return;
    }
    float tmp[32] = {0};
    for (i64 t = k0; t < K; t++) tmp[t - k0] = scalar_load(src + t);
    split16(_mm512_loadu_ps(tmp), hi, lo);
    split16(_mm512_loadu_ps(tmp + 16), hi + 16, lo + 16);
}

// Split a row of K values into bf16 hi/lo rows, zero-padded to Kp (a multiple of 32).
template <class WT>
static inline void split_row(const WT* src, i64 K, i64 Kp, uint16_t* hi, uint16_t* lo) {
    for (i64 k0 = 0; k0 < Kp; k0 += 32) split_slice(src, k0, K, hi + k0, lo + k0);
}

struct alignas(64) amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// k step kb (columns [32 kb, 32 kb + 32)) of `rows` weight rows into a tile-major panel buffer
// (see linear_amx): row i's 32 values land at kb * ts + i * 32 of hi and lo.
template <class WT>
static inline void split_panel_step(const WT* w, i64 rows, i64 kb, i64 K, i64 ts, uint16_t* hi, uint16_t* lo) {
    for (i64 i = 0; i < rows; i++) split_slice(w + i * K, kb * 32, K, hi + kb * ts + i * 32, lo + kb * ts + i * 32);
}

// The panel this thread computes next, split into bf16 halves one k step at a time between the
// current panel's tile products, its rows prefetched a few steps ahead. (Measured: the split and
// the tile unit barely overlap on one core; interleaving still spares a separate pass over W.)
template <class WT>
struct next_panel {
    const WT* w = nullptr;  // its first row, or nullptr when there is none to prepare
    i64 rows = 0;           // real rows (<= the panel's 16 or 32); the rest are zero-filled
    uint16_t* hi = nullptr;
    uint16_t* lo = nullptr;

    void step(i64 kb, i64 K, i64 ts) const {
        if (!w) return;
        const i64 ahead = (kb + 4) * 32;  // ~4 k steps of latency cover for the rows' streams
        if (ahead < K)
            for (i64 i = 0; i < rows; i++)
                for (i64 b = 0; b < (i64)sizeof(WT) * 32; b += 64)
                    _mm_prefetch((const char*)(w + i * K + ahead) + b, _MM_HINT_T0);
        split_panel_step(w, rows, kb, K, ts, hi, lo);
    }
};

// G m-blocks (16 rows of x each) against one 16-row panel of W: C tiles 0..G-1, W hi/lo in 4/5,
// x hi/lo in 6/7. Writes G 16x16 fp32 blocks (row = n, column = m) to cbuf. W halves are
// tile-major (see linear_amx), x halves are packed per m-block in VNNI pair order.
template <int G, class WT>
static inline void amx_panel(const uint16_t* wh, const uint16_t* wl, const uint16_t* xh, const uint16_t* xl,
                             i64 K, i64 Kp, i64 ts, i64 mb0, float* cbuf, const next_panel<WT>& nx) {
    const i64 half = Kp / 2;
    if (G > 0) _tile_zero(0);
    if (G > 1) _tile_zero(1);
    if (G > 2) _tile_zero(2);
    if (G > 3) _tile_zero(3);
    for (i64 kb = 0; kb < Kp / 32; kb++) {
        _tile_loadd(4, wh + kb * ts, 64);
        _tile_loadd(5, wl + kb * ts, 64);
#define JMOSS_AMX_STEP(J)                                   \
        if (G > J) {                                        \
            const i64 off = ((mb0 + J) * half + kb * 16) * 32; \
            _tile_loadd(6, xh + off, 64);                   \
            _tile_dpbf16ps(J, 4, 6);                        \
            _tile_dpbf16ps(J, 5, 6);                        \
            _tile_loadd(7, xl + off, 64);                   \
            _tile_dpbf16ps(J, 4, 7);                        \
        }
        JMOSS_AMX_STEP(0) JMOSS_AMX_STEP(1) JMOSS_AMX_STEP(2) JMOSS_AMX_STEP(3)
#undef JMOSS_AMX_STEP
        nx.step(kb, K, ts);
    }
    if (G > 0) _tile_stored(0, cbuf, 64);
    if (G > 1) _tile_stored(1, cbuf + 256, 64);
    if (G > 2) _tile_stored(2, cbuf + 512, 64);
    if (G > 3) _tile_stored(3, cbuf + 768, 64);
}

// One 32-row panel of W (halves p0 = rows 0-15, p1 = rows 16-31) against G = 1 or 2 m-blocks of
// x (16 rows each). C tiles: G = 2: 0 = (p0, b0), 1 = (p0, b1), 2 = (p1, b0), 3 = (p1, b1);
// G = 1: 0 = p0, 1 = p1. Writes the 16x16 fp32 blocks (row = n, column = m) to cbuf in tile order.
// W halves are tile-major (see linear_amx); x halves are packed per m-block in VNNI pair order.
// The 2 x 2 order needs 9 tile loads per 12 products (amx_panel<4> needs 10) and reads each x
// tile for 32 W rows instead of 16: 12% more tile throughput measured hot, and
// ~10% faster GEMMs at K = 1024 (harness); at K = 4096 its buffers crowd L2 and amx_panel is kept.
template <int G, class WT>
static inline void amx_pair(const uint16_t* wh, const uint16_t* wl, const uint16_t* xh, const uint16_t* xl,
                            i64 K, i64 Kp, i64 ts, i64 mb0, float* cbuf, const next_panel<WT>& nx) {
    const i64 half = Kp / 2, p1 = 512;
    _tile_zero(0);
    _tile_zero(1);
    if (G == 2) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (i64 kb = 0; kb < Kp / 32; kb++) {
        const i64 o0 = (mb0 * half + kb * 16) * 32, o1 = o0 + half * 32;
        if (G == 2) {
            _tile_loadd(4, xh + o0, 64);
            _tile_loadd(5, xh + o1, 64);
            _tile_loadd(6, wh + kb * ts, 64);
            _tile_dpbf16ps(0, 6, 4);
            _tile_dpbf16ps(1, 6, 5);
            _tile_loadd(7, wl + kb * ts, 64);
            _tile_dpbf16ps(0, 7, 4);
            _tile_dpbf16ps(1, 7, 5);
            _tile_loadd(6, wh + kb * ts + p1, 64);
            _tile_dpbf16ps(2, 6, 4);
            _tile_dpbf16ps(3, 6, 5);
            _tile_loadd(7, wl + kb * ts + p1, 64);
            _tile_dpbf16ps(2, 7, 4);
            _tile_dpbf16ps(3, 7, 5);
            _tile_loadd(4, xl + o0, 64);
            _tile_loadd(5, xl + o1, 64);
            _tile_dpbf16ps(2, 6, 4);
            _tile_dpbf16ps(3, 6, 5);
            _tile_loadd(7, wh + kb * ts, 64);
            _tile_dpbf16ps(0, 7, 4);
            _tile_dpbf16ps(1, 7, 5);
        } else {
            _tile_loadd(4, xh + o0, 64);
            _tile_loadd(5, xl + o0, 64);
            _tile_loadd(6, wh + kb * ts, 64);
            _tile_dpbf16ps(0, 6, 4);
            _tile_dpbf16ps(0, 6, 5);
            _tile_loadd(7, wl + kb * ts, 64);
            _tile_dpbf16ps(0, 7, 4);
            _tile_loadd(6, wh + kb * ts + p1, 64);
            _tile_dpbf16ps(1, 6, 4);
            _tile_dpbf16ps(1, 6, 5);
            _tile_loadd(7, wl + kb * ts + p1, 64);
            _tile_dpbf16ps(1, 7, 4);
        }
        nx.step(kb, K, ts);
    }
    _tile_stored(0, cbuf, 64);
    _tile_stored(1, cbuf + 256, 64);
    if (G == 2) {
        _tile_stored(2, cbuf + 512, 64);
        _tile_stored(3, cbuf + 768, 64);
    }
}

// Panels of PR = 16 or 32 W rows (amx_panel / amx_pair) are handed out 8 at a time, so a thread
// knows its next panel and can prepare it during the current one (a shared machine still
// rebalances between chunks).
template <int PR, class WT, class BT>
static void linear_amx(const float* x, const WT* w, const BT* bias, float* y, i64 M, i64 K, i64 N, int threads,
                       int act) {
    const i64 AMX_PANELS = 8, GM = PR == 16 ? 4 : 2;  // panels per chunk, m-blocks per tile group
    const i64 Kp = (K + 31) / 32 * 32, half = Kp / 2;
    const i64 MBn = (M + 15) / 16, NBn = (N + PR - 1) / PR;
    // x^T packed per 16-row m-block as [k pair][16 m][2] bf16, hi and lo; reused between calls.
    static thread_local std::vector<uint16_t> xpack;
    uint16_t* xh = aligned64(xpack, 2 * MBn * 16 * Kp);
    uint16_t* xl = xh + MBn * 16 * Kp;
    if (threads > NBn) threads = (int)std::max<i64>(1, NBn);
#pragma omp parallel num_threads(threads)
    {
        static thread_local std::vector<uint16_t> scratch;
        uint16_t* rh = aligned64(scratch, 4 * Kp);
        uint16_t* rl = rh + 2 * Kp;
#pragma omp for schedule(static)
        for (i64 m = 0; m < MBn * 16; m++) {
            const i64 mb = m / 16, mm = m % 16;
            if (m < M) {
                split_row(x + m * K, K, Kp, rh, rl);
            } else {
                std::memset(rh, 0, Kp * 2);
                std::memset(rl, 0, Kp * 2);
            }
            uint32_t* dh = (uint32_t*)xh + mb * half * 16 + mm;
            uint32_t* dl = (uint32_t*)xl + mb * half * 16 + mm;
            const uint32_t* sh = (const uint32_t*)rh;
            const uint32_t* sl = (const uint32_t*)rl;
            for (i64 r = 0; r < half; r++) {
                dh[r * 16] = sh[r];
                dl[r * 16] = sl[r];
            }
        }  // implicit barrier: x is packed before any panel reads it

        amx_config cfg;
        std::memset(&cfg, 0, sizeof(cfg));
        cfg.palette = 1;
        for (int t = 0; t < 8; t++) {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        _tile_loadconfig(&cfg);
        // Two panel buffers (hi then lo, PR rows each): the current one and the one being prepared.
        // Tile-major: the 32 columns of k step kb for all PR rows are one contiguous run of ts = PR * 32
        // elements (16-row tiles of 1 KiB), so tile loads are contiguous (row-strided ones measured ~2x
        // slower) and the split of a k step writes one sequential run. (A row-major [PR][Kp] layout
        // also needs its rows padded: at K a multiple of 2048 they alias in L1.) Halves and buffers
        // are 64 bytes off each other's 4 KiB alignment.
        const i64 ts = PR * 32, half_elems = PR * Kp + 32, buf_elems = 2 * half_elems + 32;
        static thread_local std::vector<uint16_t> wpack;
        if ((i64)wpack.size() < 2 * buf_elems + 32) wpack.resize(2 * buf_elems + 32);
        uint16_t* base = (uint16_t*)(((uintptr_t)wpack.data() + 63) & ~(uintptr_t)63);
        uint16_t* panel[2] = {base, base + buf_elems};
        int cur = 0;
        i64 prepared = -1;  // the panel index whose halves already sit in panel[cur]
        alignas(64) float cbuf[4 * 256];
        const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(16));
#pragma omp for schedule(dynamic, AMX_PANELS)
        for (i64 nb = 0; nb < NBn; nb++) {
            const i64 n0 = nb * PR, nn = std::min<i64>(PR, N - n0);
            uint16_t* wh = panel[cur];
            uint16_t* wl = wh + half_elems;
            if (prepared != nb)
                for (i64 kb = 0; kb < Kp / 32; kb++) split_panel_step(w + n0 * K, nn, kb, K, ts, wh, wl);
            for (i64 i = nn; i < PR; i++) {  // only the last panel of an N % PR != 0 layer
                for (i64 kb = 0; kb < Kp / 32; kb++) {
                    std::memset(wh + kb * ts + i * 32, 0, 64);
                    std::memset(wl + kb * ts + i * 32, 0, 64);
                }
            }
            next_panel<WT> nx;
            if ((nb + 1) % AMX_PANELS != 0 && nb + 1 < NBn) {  // same chunk: this thread computes it next
                nx.w = w + (n0 + PR) * K;
                nx.rows = std::min<i64>(PR, N - n0 - PR);
                nx.hi = panel[cur ^ 1];
                nx.lo = nx.hi + half_elems;
            }
            const next_panel<WT> none;
            // Per 16-column part of the panel: which output columns are real, and their bias.
            __mmask16 keep[2] = {0, 0};
            __m512 bias16[2];
            for (int p = 0; p < PR / 16; p++) {
                const i64 cols = std::max<i64>(0, std::min<i64>(16, nn - 16 * p));
                keep[p] = (__mmask16)((1u << cols) - 1);
                alignas(64) float bias_tmp[16] = {0};
                if (bias)
                    for (i64 i = 0; i < cols; i++) bias_tmp[i] = scalar_load(bias + n0 + 16 * p + i);
                bias16[p] = _mm512_load_ps(bias_tmp);
            }
            for (i64 mb0 = 0; mb0 < MBn; mb0 += GM) {
                const int g = (int)std::min<i64>(GM, MBn - mb0);
                const next_panel<WT>& prep = mb0 == 0 ? nx : none;
                if (PR == 32) {
                    if (g == 2)
                        amx_pair<2>(wh, wl, xh, xl, K, Kp, ts, mb0, cbuf, prep);
                    else
                        amx_pair<1>(wh, wl, xh, xl, K, Kp, ts, mb0, cbuf, prep);
                } else {
                    switch (g) {
                        case 4: amx_panel<4>(wh, wl, xh, xl, K, Kp, ts, mb0, cbuf, prep); break;
                        case 3: amx_panel<3>(wh, wl, xh, xl, K, Kp, ts, mb0, cbuf, prep); break;
                        case 2: amx_panel<2>(wh, wl, xh, xl, K, Kp, ts, mb0, cbuf, prep); break;
                        default: amx_panel<1>(wh, wl, xh, xl, K, Kp, ts, mb0, cbuf, prep); break;
                    }
                }
                // cbuf holds y^T blocks (row = n): one gather per output row and half turns them back.
                const i64 m_end = std::min<i64>(M, (mb0 + g) * 16);
                for (i64 m = mb0 * 16; m < m_end; m++) {
                    const i64 b = m / 16 - mb0;
                    for (int p = 0; p < PR / 16 && keep[p]; p++) {
                        // tile of (panel part p, m-block b): amx_panel: b; amx_pair: p * 2 + b, or p if g == 1
                        const i64 tile = PR == 16 ? b : g == 2 ? p * 2 + b : p;
                        const float* c = cbuf + tile * 256 + (m % 16);
                        __m512 v = _mm512_add_ps(_mm512_i32gather_ps(column, c, 4), bias16[p]);
                        if (act == 1) v = gelu_new16(v);
                        _mm512_mask_storeu_ps(y + m * N + n0 + 16 * p, keep[p], v);
                    }
                }
            }
            if (nx.w) {
                cur ^= 1;
                prepared = nb + 1;
            }
        }
        _tile_release();
    }
}
#endif

// Output columns (rows of W) are handed out in chunks of CHUNK rows from a shared counter
// (OpenMP dynamic schedule): each chunk is a long sequential run of weights, and on a shared
// machine a thread that loses its core does not hold the whole op back as a static split would.
// Bias and activation are applied per chunk right after it is computed, while it is in cache.
template <class WT, class BT>
static void linear(const float* x, const WT* w, const BT* bias, float* y, i64 M, i64 K, i64 N, int threads,
                   int act, int amx_min_m = 0) {
#if JMOSS_AMX
    if (amx_min_m > 0 && M >= amx_min_m && amx_ready()) {
        // Every W panel sweeps all of the packed x, so long prompts go in slabs of rows whose packed
        // x (4 bytes per element) stays near 1 MiB, in L2; never below 64 rows (one 4-tile group),
        // where each W split still feeds 3 x 64 products per weight.
        const i64 Kp = (K + 31) / 32 * 32;
        const i64 slab = std::min<i64>(512, std::max<i64>(64, (i64(1) << 20) / (4 * Kp) / 64 * 64));
        for (i64 m0 = 0; m0 < M; m0 += slab) {
            // 32-row panels while their two buffers (4 * 32 * Kp bytes each) stay small next to L2.
            if (Kp <= 2048)
                linear_amx<32>(x + m0 * K, w, bias, y + m0 * N, std::min(slab, M - m0), K, N, threads, act);
            else
                linear_amx<16>(x + m0 * K, w, bias, y + m0 * N, std::min(slab, M - m0), K, N, threads, act);
        }
        return;
    }
#endif
#if JMOSS_ISA >= 1
    if (M >= GEMM_MIN_M) {
        gemm_panels(x, (const int32_t*)nullptr, bias, y, M, K, N, threads, act, widen_panel<WT>{w, K});
        return;
    }
#endif
    const i64 CHUNK = 32;
    const i64 nchunks = (N + CHUNK - 1) / CHUNK;
    if (threads < 1) threads = 1;
    if (threads > nchunks) threads = (int)std::max<i64>(1, nchunks);
    // M-blocking keeps the slab of x that sweeps past each W tile inside L2 (~512 KiB of x).
    const i64 MB = std::max<i64>(4, std::min<i64>(M, (512 * 1024 / 4) / std::max<i64>(K, 1) / 4 * 4));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (i64 c = 0; c < nchunks; c++) {
        const i64 n_begin = c * CHUNK, n_end = std::min(N, n_begin + CHUNK);
        for (i64 mb = 0; mb < M; mb += MB) {
            const i64 me = std::min(M, mb + MB);
            for (i64 n0 = n_begin; n0 < n_end; n0 += 4) {
                const int nr = (int)std::min<i64>(4, n_end - n0);
                i64 m0 = mb;
                for (; m0 + 4 <= me; m0 += 4) tile_nr<4>(x, w, y, m0, n0, nr, K, N);
                if (m0 < me) tile_any(x, w, y, m0, (int)(me - m0), n0, nr, K, N);
            }
        }
        if (bias || act) {
            for (i64 m = 0; m < M; m++) {
                float* row = y + m * N;
                if (bias) {
#pragma omp simd
                    for (i64 n = n_begin; n < n_end; n++) row[n] += scalar_load(bias + n);
                }
                if (act == 1) {
                    gelu_row(row + n_begin, n_end - n_begin);
                }
            }
        }
    }
}


// ------------------------------------------------------------------------------------------
// The rest of a decoder layer, fused so that a decode step is a handful of ops instead of ~60
// small jittor ops (each ~3-20 us of graph building and dispatch; jittor-notes §7). All fp32.

// LayerNorm over rows of D, statistics in two passes exactly as the reference (mean, then the
// mean of squared deviations). Decode is one row of 1024: not worth waking a second thread.
template <class PT>
static void layer_norm(const float* x, const PT* w, const PT* b, float* y, i64 M, i64 D, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (M >= 8)
    for (i64 m = 0; m < M; m++) {
        const float* xr = x + m * D;
        float* yr = y + m * D;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (i64 i = 0; i < D; i++) sum += xr[i];
        const float mean = sum / (float)D;
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (i64 i = 0; i < D; i++) sq += (xr[i] - mean) * (xr[i] - mean);
        const float inv = 1.0f / std::sqrt(sq / (float)D + eps);
        for (i64 i = 0; i < D; i++) yr[i] = (xr[i] - mean) * inv * scalar_load(w + i) + scalar_load(b + i);
    }
}

// Split the fused qkv rows [B*T, 3*H*Dh] ([q heads | k heads | v heads]), rotate the first R dims
// of q and k in adjacent pairs (GPT-J "rotate every two") with per-token sin/cos [B*T, R/2], and
// lay k and v out as [B, H, T, Dh] ready to be written into the cache. q stays [B*T, H*Dh].
static void rotary_split(const float* qkv, const float* sn, const float* cs, float* q, float* k, float* v,
                         i64 B, i64 T, i64 H, i64 Dh, i64 R) {
    const i64 Dm = H * Dh, half = R / 2;
    for (i64 bt = 0; bt < B * T; bt++) {
        const i64 bb = bt / T, t = bt % T;
        const float* row = qkv + bt * 3 * Dm;
        const float* s = sn + bt * half;
        const float* c = cs + bt * half;
        for (i64 h = 0; h < H; h++) {
            const float* qi = row + h * Dh;
            const float* ki = row + Dm + h * Dh;
            const float* vi = row + 2 * Dm + h * Dh;
            float* qo = q + bt * Dm + h * Dh;
            float* ko = k + ((bb * H + h) * T + t) * Dh;
            float* vo = v + ((bb * H + h) * T + t) * Dh;
            for (i64 i = 0; i < half; i++) {
                qo[2 * i] = qi[2 * i] * c[i] - qi[2 * i + 1] * s[i];
                qo[2 * i + 1] = qi[2 * i + 1] * c[i] + qi[2 * i] * s[i];
                ko[2 * i] = ki[2 * i] * c[i] - ki[2 * i + 1] * s[i];
                ko[2 * i + 1] = ki[2 * i + 1] * c[i] + ki[2 * i] * s[i];
            }
            for (i64 e = R; e < Dh; e++) {
                qo[e] = qi[e];
                ko[e] = ki[e];
            }
            std::memcpy(vo, vi, Dh * sizeof(float));
        }
    }
}

#if JMOSS_ISA == 2
// Lane r of the result = the sum of a[r]'s 16 lanes: a transpose-and-add tree (3 levels of
// in-lane unpack/shuffle, 2 of 128-bit lane shuffles) instead of 16 horizontal reductions.
static inline __m512 sum16x16(const __m512 a[16]) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 f01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 f23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// q . k_r for the 16 consecutive cache rows k_0..k_15 (row stride Dh), any Dh.
static inline __m512 dot16(const float* q, const float* k, i64 Dh) {
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    i64 e = 0;
    for (; e + 16 <= Dh; e += 16) {
        const __m512 qv = _mm512_loadu_ps(q + e);
        for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + r * Dh + e), acc[r]);
    }
    if (e < Dh) {
        const __mmask16 m = (__mmask16)((1u << (Dh - e)) - 1);
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + e);
        for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + r * Dh + e), acc[r]);
    }
    return sum16x16(acc);
}
#endif

// One query row's scores sc[j] = q . k_j / sqrt(Dh) + bias[j] over j < S. Where the bias is the
// mask value (float32's minimum) the dot product cannot change the sum (it is far below half an
// ulp of 3.4e38), so masked blocks of 16 -- half of a causal prefill -- skip it.
static inline void attention_scores(const float* qr, const float* kb, const float* br, float* sc, i64 S, i64 Dh,
                                    float inv_root) {
    i64 j = 0;
#if JMOSS_ISA == 2
    const __m512 masked = _mm512_set1_ps(-1.0e30f), scale = _mm512_set1_ps(inv_root);
    for (; j + 16 <= S; j += 16) {
        const __m512 bv = _mm512_loadu_ps(br + j);
        if (_mm512_cmp_ps_mask(bv, masked, _CMP_LE_OQ) == 0xFFFF) {
            _mm512_storeu_ps(sc + j, bv);
            continue;
        }
        _mm512_storeu_ps(sc + j, _mm512_fmadd_ps(dot16(qr, kb + j * Dh, Dh), scale, bv));
    }
#endif
    for (; j < S; j++) {
        const float* kr = kb + j * Dh;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (i64 e = 0; e < Dh; e++) d += qr[e] * kr[e];
        sc[j] = d * inv_root + br[j];
    }
}

// sc[j] = exp(sc[j] - max) (0 where that is below -87: masked scores, exactly as the reference
// gives them), returning the sum.
static inline float softmax_numerators(float* sc, i64 S) {
    i64 j = 0;
    float mx = -3.0e38f;
#if JMOSS_ISA == 2
    __m512 mv = _mm512_set1_ps(-3.0e38f);
    for (; j + 16 <= S; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sc + j));
    mx = _mm512_reduce_max_ps(mv);
#endif
    for (; j < S; j++) mx = std::max(mx, sc[j]);
    float total = 0.f;
    j = 0;
#if JMOSS_ISA == 2
    const __m512 mxv = _mm512_set1_ps(mx), floor = _mm512_set1_ps(-87.0f);
    __m512 tv = _mm512_setzero_ps();
    for (; j < S; j += 16) {
        const __mmask16 m = S - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - j)) - 1);
        const __m512 z = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j), mxv);
        const __mmask16 live = _mm512_mask_cmp_ps_mask(m, z, floor, _CMP_GE_OQ);
        const __m512 ez = _mm512_maskz_mov_ps(live, vexp_bounded(_mm512_max_ps(z, floor)));
        _mm512_mask_storeu_ps(sc + j, m, ez);
        tv = _mm512_add_ps(tv, ez);
    }
    total = _mm512_reduce_add_ps(tv);
#else
    for (; j < S; j++) {
        // -Ofast assumes no infinities, so expf never sees the masked scores (~3.4e38 below).
        const float z = sc[j] - mx;
        sc[j] = z < -87.0f ? 0.0f : expf(z);
        total += sc[j];
    }
#endif
    return total;
}

// o = inv * sum_j sc[j] v_j over j < S, skipping masked keys (sc[j] == 0 contributes nothing).
static inline void attention_values(const float* sc, float inv, const float* vb, float* o, i64 S, i64 Dh) {
#if JMOSS_ISA == 2
    // 64 output columns at a time in four registers, any Dh (masked lanes past it load nothing).
    for (i64 e0 = 0; e0 < Dh; e0 += 64) {
        __mmask16 m[4];
        for (int v = 0; v < 4; v++) {
            const i64 lanes = std::min<i64>(16, std::max<i64>(0, Dh - e0 - 16 * v));
            m[v] = (__mmask16)((1u << lanes) - 1);
        }
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (i64 j = 0; j < S; j++) {
            if (sc[j] == 0.0f) continue;
            const __m512 p = _mm512_set1_ps(sc[j] * inv);
            const float* vr = vb + j * Dh + e0;
            for (int v = 0; v < 4; v++) acc[v] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m[v], vr + 16 * v), acc[v]);
        }
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(o + e0 + 16 * v, m[v], acc[v]);
    }
#else
    for (i64 e = 0; e < Dh; e++) o[e] = 0.f;
    for (i64 j = 0; j < S; j++) {
        if (sc[j] == 0.0f) continue;
        const float p = sc[j] * inv;
        const float* vr = vb + j * Dh;
#pragma omp simd
        for (i64 e = 0; e < Dh; e++) o[e] += p * vr[e];
    }
#endif
}

// softmax(q . K^T / sqrt(Dh) + bias) . V for every (batch, head, query), reading the static cache
// [B, H, L, Dh] in place over its first S = start + T slots (no [B, H, S, Dh] slice is copied).
// bias [B, T, S] is the additive causal/padding mask (0 or float32's minimum). Output rows are
// head-merged [B*T, H*Dh], i.e. what out_proj reads. Scores use a per-thread scratch of S floats.
static void attention(const float* q, const float* keys, const float* values, const float* bias, float* ctx,
                      i64 B, i64 T, i64 H, i64 Dh, i64 L, i64 S, int threads) {
    const i64 Dm = H * Dh;
    const float inv_root = 1.0f / std::sqrt((float)Dh);
    const i64 jobs = B * H * T;
#pragma omp parallel num_threads(threads) if (jobs * S * Dh >= 65536)
    {
        float local[4096];
        float* sc = S <= 4096 ? local : new float[S];
#pragma omp for schedule(dynamic, 1)
        for (i64 job = 0; job < jobs; job++) {
            const i64 bb = job / (H * T), h = (job / T) % H, t = job % T;
            const float* qr = q + (bb * T + t) * Dm + h * Dh;
            const float* kb = keys + (bb * H + h) * L * Dh;
            const float* vb = values + (bb * H + h) * L * Dh;
            attention_scores(qr, kb, bias + (bb * T + t) * S, sc, S, Dh, inv_root);
            const float inv = 1.0f / softmax_numerators(sc, S);
            attention_values(sc, inv, vb, ctx + (bb * T + t) * Dm + h * Dh, S, Dh);
        }
        if (sc != local) delete[] sc;
    }
}

}  // namespace jmoss_k

static const float jmoss_k_one[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// Entry points called from cpu_src; overloads pick the weight/bias element types jittor hands us.
static inline const uint16_t* jmoss_raw(const jittor::float16* p) { return reinterpret_cast<const uint16_t*>(p); }
static inline const float* jmoss_raw(const float* p) { return p; }

// Memory-bandwidth probe: every thread sums its contiguous share of a buffer with the same wide
// loads the GEMV uses. This is the roof the GEMV is judged against (same threads, same compiler,
// same access pattern, no arithmetic to speak of).
static inline float jmoss_read_probe(const float* p, int64_t n, int threads) {
    float total = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t b = n * t / nt, e = n * (t + 1) / nt;
        int64_t i = b;
        float s = 0.f;
#if JMOSS_ISA >= 1
        using namespace jmoss_k;
        vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero(), one = vload(&jmoss_k_one[0]);
        for (; i + 4 * VW <= e; i += 4 * VW) {
            a0 = vfma(vload(p + i), one, a0);
            a1 = vfma(vload(p + i + VW), one, a1);
            a2 = vfma(vload(p + i + 2 * VW), one, a2);
            a3 = vfma(vload(p + i + 3 * VW), one, a3);
        }
        s = vsum(a0) + vsum(a1) + vsum(a2) + vsum(a3);
#endif
        for (; i < e; i++) s += p[i];
        total += s;
    }
    return total;
}

// 1 when the AMX-BF16 prefill path is compiled in and Linux grants the tile state here.
static inline int jmoss_amx_ready() {
#if JMOSS_AMX
    return jmoss_k::amx_ready() ? 1 : 0;
#else
    return 0;
#endif
}

// How many OpenMP threads a parallel region asked for `threads` really gets (tests, info()).
static inline int jmoss_threads_used(int threads) {
    int used = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp atomic
        used += 1;
    }
    return used;
}

// ------------------------------------------------------------------------------------------
// Packed int8 / int4 weights (store format 2, docs/store-format.md "Packed layers").
//
// Row n of q holds the K values of output n along the *permuted* input (x is read through perm
// once per call into xp), LSB first: int8 one per byte, int4 value j in the low nibble of byte
// j/2 when j is even, the high nibble when odd; rows are ldq bytes apart. scales/zeros are fp16
// [N, G], G = ceil(K / GS):  W[n, j] = s[n, g] * (q[n, j] - z[n, g]),  g = j / GS.
//
// GEMV (M < QUANT_PANEL_MIN_M): dequantization fused into the dot product, never written out:
//   y[n] = sum_g s[n,g] * (sum_{j in g} xp[j] q[n,j]) - sum_g s[n,g] z[n,g] xsum[g],
// the integer codes widened in registers (vpmovzxbd + vcvtdq2ps) straight into the FMAs, one
// vector accumulator per row and group folded into the row total with one FMA by s at the end of
// the group; xsum (the per-group sums of xp) is computed once per call. Four rows share each
// load of x, as in the fp16 GEMV; int4 with GS % (2 VW) == 0 takes qdot4 instead (below). Prefill: each thread dequantizes a 12-row (AVX2: 6) panel of W
// into fp32 (exact: (q - z) is a small integer, s an fp16) in a per-thread buffer and runs the
// outer-product GEMM of jmoss_k::gemm_panels over it, so a weight is dequantized once per x slab;
// the portable path keeps the 4x4 dot-product tile over 4-row panels.
namespace jmoss_q {
using jmoss_k::i64;

template <int BITS>
static inline float q_at(const uint8_t* row, i64 j) {
    if (BITS == 8) return (float)row[j];
    const uint8_t b = row[j >> 1];
    return (float)((j & 1) ? (b >> 4) : (b & 15));
}

#if JMOSS_ISA >= 1
using jmoss_k::vec;
using jmoss_k::VW;
// VW consecutive codes starting at j (j a multiple of VW, so an int4 run starts on a byte).
template <int BITS>
static inline vec vload_q(const uint8_t* row, i64 j) {
#if JMOSS_ISA == 2
    if (BITS == 8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + j))));
    const __m128i b = _mm_loadl_epi64((const __m128i*)(row + j / 2));
    const __m128i m = _mm_set1_epi8(15);
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
#else
    if (BITS == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + j))));
    int32_t word;
    std::memcpy(&word, row + j / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(word);
    const __m128i m = _mm_set1_epi8(15);
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
#endif
}
using jmoss_k::vbroadcast1;
#endif

// Fused dequantizing dot products of one x row with NR packed rows.
template <int BITS, int NR>
static inline void qdot(const float* x, const float* xsum, const uint8_t* q, i64 ldq, const uint16_t* s,
                        const uint16_t* z, i64 G, i64 K, i64 GS, float* res) {
    float zt[NR];
    for (int r = 0; r < NR; r++) zt[r] = 0.f;
#if JMOSS_ISA >= 1
    vec tot[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) tot[r] = jmoss_k::vzero();
#else
    float tot[NR];
    for (int r = 0; r < NR; r++) tot[r] = 0.f;
#endif
    for (i64 g = 0; g < G; g++) {
        const i64 j0 = g * GS, j1 = std::min(K, j0 + GS);
        float tail[NR];
        for (int r = 0; r < NR; r++) tail[r] = 0.f;
        i64 j = j0;
#if JMOSS_ISA >= 1
        vec acc[NR];
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) acc[r] = jmoss_k::vzero();
        if (GS % VW == 0) {
            for (; j + VW <= j1; j += VW) {
#pragma GCC unroll 8
                for (int r = 0; r < NR; r++) _mm_prefetch((const char*)(q + r * ldq + j * BITS / 8 + 2 * NR * ldq), _MM_HINT_T0);
                const vec xv = jmoss_k::vload(x + j);
#pragma GCC unroll 8
                for (int r = 0; r < NR; r++) acc[r] = jmoss_k::vfma(xv, vload_q<BITS>(q + r * ldq, j), acc[r]);
            }
        }
#endif
        for (; j < j1; j++)
            for (int r = 0; r < NR; r++) tail[r] += x[j] * q_at<BITS>(q + r * ldq, j);
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) {
            const float sc = jmoss_k::scalar_load(s + r * G + g);
            const float zp = jmoss_k::scalar_load(z + r * G + g);
#if JMOSS_ISA >= 1
            tot[r] = jmoss_k::vfma(acc[r], vbroadcast1(sc), tot[r]);
#endif
            zt[r] += sc * (zp * xsum[g] - tail[r]);
        }
    }
    for (int r = 0; r < NR; r++) {
#if JMOSS_ISA >= 1
        res[r] = jmoss_k::vsum(tot[r]) - zt[r];
#else
        res[r] = tot[r] - zt[r];
#endif
    }
}

#if JMOSS_ISA >= 1
// int4 decode: the codes of VW bytes are widened to VW dword lanes once (vpmovzxbd), and the low
// and high nibbles of each lane are used where they are, so nothing is interleaved in registers:
// x is handed over "deinterleaved" per block of Q4B = 2 VW codes instead (xr: the block's VW
// even-position values, then its VW odd ones; made once per call by q4_deinterleave, a K-float
// copy shared by every row). Needs GS % Q4B == 0 so blocks never straddle a group; a tail shorter
// than a block keeps its natural order and is done in scalar.
//   AVX-512: each (row, group) gets a 16-entry table (c - z) * s, c = 0..15 (the exact dequantized
//   values, as dequant_panel computes them) and vpermps looks the nibbles up in it (it reads only
//   the low 4 bits of each index lane): 1 load, 1 widen, 1 shift, 2 permutes and 2 FMAs per row
//   and 32 codes, no per-group scale or zero-point term.
//   AVX2: the nibbles are masked and converted (vcvtdq2ps), scale and zero point per group as in qdot.
// Both prefetch Q4_PF row sets ahead (q4_prefetch): the hardware prefetcher alone left one core at
// 6 GB/s of its 21 on the 350M shapes read from DRAM (9-10 GB/s with it; 2 cores 11 -> 14.5).
static const i64 Q4B = 2 * VW;
static const int Q4_PF = 4;

static inline void q4_deinterleave(const float* xp, i64 K, float* xr) {
    i64 j = 0;
    for (; j + Q4B <= K; j += Q4B)
        for (int i = 0; i < VW; i++) {
            xr[j + i] = xp[j + 2 * i];
            xr[j + VW + i] = xp[j + 2 * i + 1];
        }
    for (; j < K; j++) xr[j] = xp[j];
}

template <int NR>
static inline void q4_prefetch(const uint8_t* q, i64 ldq, i64 j) {
    // Every step, not once per line: on Zen 4 a prefetch that finds the miss buffers full is
    // dropped, and once per line left the single core at 6 GB/s (every step: 9-10).
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) _mm_prefetch((const char*)(q + r * ldq + j / 2 + Q4_PF * NR * ldq), _MM_HINT_T0);
}

template <int NR>
static inline void qdot4(const float* xr, const float* xsum, const uint8_t* q, i64 ldq, const uint16_t* s,
                         const uint16_t* z, i64 G, i64 K, i64 GS, float* res) {
    float tail[NR];
    for (int r = 0; r < NR; r++) tail[r] = 0.f;
#if JMOSS_ISA == 2
    (void)xsum;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 lo[NR], hi[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) lo[r] = hi[r] = _mm512_setzero_ps();
    for (i64 g = 0; g < G; g++) {
        const i64 j0 = g * GS, j1 = std::min(K, j0 + GS);
        __m512 tb[NR];
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++)
            tb[r] = _mm512_mul_ps(_mm512_sub_ps(iota, vbroadcast1(jmoss_k::scalar_load(z + r * G + g))),
                                  vbroadcast1(jmoss_k::scalar_load(s + r * G + g)));
        i64 j = j0;
        for (; j + Q4B <= j1; j += Q4B) {
            q4_prefetch<NR>(q, ldq, j);
            const __m512 xe = _mm512_loadu_ps(xr + j), xo = _mm512_loadu_ps(xr + j + VW);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) {
                const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + r * ldq + j / 2)));
                lo[r] = _mm512_fmadd_ps(xe, _mm512_permutexvar_ps(d, tb[r]), lo[r]);
                hi[r] = _mm512_fmadd_ps(xo, _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), tb[r]), hi[r]);
            }
        }
        for (; j < j1; j++)
            for (int r = 0; r < NR; r++)
                tail[r] += xr[j] * ((q_at<4>(q + r * ldq, j) - jmoss_k::scalar_load(z + r * G + g)) *
                                    jmoss_k::scalar_load(s + r * G + g));
    }
    for (int r = 0; r < NR; r++) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r])) + tail[r];
#else
    float zt[NR];
    vec tot[NR];
    for (int r = 0; r < NR; r++) {
        zt[r] = 0.f;
        tot[r] = jmoss_k::vzero();
    }
    const __m256i m15 = _mm256_set1_epi32(15);
    for (i64 g = 0; g < G; g++) {
        const i64 j0 = g * GS, j1 = std::min(K, j0 + GS);
        vec lo[NR], hi[NR];
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) {
            lo[r] = hi[r] = jmoss_k::vzero();
            tail[r] = 0.f;
        }
        i64 j = j0;
        for (; j + Q4B <= j1; j += Q4B) {
            q4_prefetch<NR>(q, ldq, j);
            const vec xe = _mm256_loadu_ps(xr + j), xo = _mm256_loadu_ps(xr + j + VW);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) {
                const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + r * ldq + j / 2)));
                lo[r] = _mm256_fmadd_ps(xe, _mm256_cvtepi32_ps(_mm256_and_si256(d, m15)), lo[r]);
                hi[r] = _mm256_fmadd_ps(xo, _mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4)), hi[r]);
            }
        }
        for (; j < j1; j++)
            for (int r = 0; r < NR; r++) tail[r] += xr[j] * q_at<4>(q + r * ldq, j);
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) {
            const float sc = jmoss_k::scalar_load(s + r * G + g);
            const float zp = jmoss_k::scalar_load(z + r * G + g);
            tot[r] = jmoss_k::vfma(_mm256_add_ps(lo[r], hi[r]), vbroadcast1(sc), tot[r]);
            zt[r] += sc * (zp * xsum[g] - tail[r]);
        }
    }
    for (int r = 0; r < NR; r++) res[r] = jmoss_k::vsum(tot[r]) - zt[r];
#endif
}
#endif

template <int BITS, int NR>
static inline void qgemv_rows(const float* xp, const float* xs, const uint8_t* q, i64 ldq, const uint16_t* s,
                              const uint16_t* z, float* y, i64 M, i64 n0, i64 G, i64 K, i64 N, i64 GS) {
    float res[NR];
    for (i64 m = 0; m < M; m++) {
#if JMOSS_ISA >= 1
        if (BITS == 4 && GS % Q4B == 0)  // xp holds q4_deinterleave's order then (see qlinear)
            qdot4<NR>(xp + m * K, xs + m * G, q + n0 * ldq, ldq, s + n0 * G, z + n0 * G, G, K, GS, res);
        else
#endif
            qdot<BITS, NR>(xp + m * K, xs + m * G, q + n0 * ldq, ldq, s + n0 * G, z + n0 * G, G, K, GS, res);
        for (int r = 0; r < NR; r++) y[m * N + n0 + r] = res[r];
    }
}

static const i64 QUANT_PANEL_MIN_M = 4;

// rows packed rows of W from n0 dequantized into fp32 [rows][K] (exact: (q - z) * s); every ISA.
template <int BITS>
struct dequant_panel {
    const uint8_t* q;
    const uint16_t* s;
    const uint16_t* z;
    i64 K, ldq, GS, G;
    void operator()(i64 n0, int rows, float* w) const {
        for (int r = 0; r < rows; r++) {
            const uint8_t* row = q + (n0 + r) * ldq;
            for (i64 g = 0; g < G; g++) {
                const float sc = jmoss_k::scalar_load(s + (n0 + r) * G + g);
                const float zp = jmoss_k::scalar_load(z + (n0 + r) * G + g);
                const i64 j1 = std::min(K, (g + 1) * GS);
                i64 j = g * GS;
#if JMOSS_ISA >= 1
                if (GS % VW == 0) {
                    const vec vs = vbroadcast1(sc), vz = vbroadcast1(zp);
                    for (; j + VW <= j1; j += VW) {
#if JMOSS_ISA == 2
                        _mm512_storeu_ps(w + r * K + j, _mm512_mul_ps(_mm512_sub_ps(vload_q<BITS>(row, j), vz), vs));
#else
                        _mm256_storeu_ps(w + r * K + j, _mm256_mul_ps(_mm256_sub_ps(vload_q<BITS>(row, j), vz), vs));
#endif
                    }
                }
#endif
                for (; j < j1; j++) w[r * K + j] = (q_at<BITS>(row, j) - zp) * sc;
            }
        }
    }
};

#if JMOSS_ISA >= 1
// Prefill: the register-blocked GEMM of jmoss_k over panels dequantized per thread, x read through perm.
template <int BITS, class BT>
static void gemm_panels_q(const float* x, const int32_t* perm, const uint8_t* q, const uint16_t* s, const uint16_t* z,
                          const BT* bias, float* y, i64 M, i64 K, i64 N, i64 ldq, i64 GS, int threads, int act) {
    const i64 G = (K + GS - 1) / GS;
    jmoss_k::gemm_panels(x, perm, bias, y, M, K, N, threads, act, dequant_panel<BITS>{q, s, z, K, ldq, GS, G});
}
#endif

#if JMOSS_ISA == 2 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JMOSS_VNNI 1
// Opt-in prefill compute mode "int8" (quant_compute="int8"): activations quantized per row to
// 8 bits and the integer products done by AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products into 16
// int32 lanes per instruction, 4x the fp32 FMA rate), what CTranslate2's int8 modes do. Not
// fp32-exact: each activation is off by up to max|x_row| / 254, so results carry ~1e-3-1e-2
// relative error (reported by tests and the benchmark); the default stays the fp32 GEMM.
//
//   x[m, j] ~ sx_m (qx[m, j] - 128),  qx in [1, 255],  sx_m = max_j |x[m, j]| / 127
//   W[n, j] = s[n, g] (q[n, j] - z[n, g]) = s (w'[n, j] + c - z),  w' = q - c  (c = 128 for int8, 0 for int4)
//   sum_{j in g} x W = sx_m s [ (sum qx w' - 128 sum w') + (c - z) sum (qx - 128) ]
// The bracketed difference is exact in int32 (|.| <= 255 * 128 * GS); the sums are per (row, group)
// made once per panel / per slab. Tiles are 12 rows of w' x 32 rows of x: x packed [K/4][32][4]
// bytes (one zmm = 16 rows x 4 consecutive k), each 4 bytes of a w' row broadcast to all lanes.
static const int VNNI_PR = 12;
static const i64 VNNI_MB = 32;


struct vnni_panel {  // per-thread: PR rows of w' [PR][Kp] and per (row, group) factors
    std::vector<int8_t> w;
    std::vector<float> a, e;     // s, s (c - z)
    std::vector<int32_t> b;      // 128 sum(w'), subtracted in int32 (exact, no cancellation in fp32)
    std::vector<int32_t> gsum;
};

template <int BITS>
static inline void vnni_make_panel(const uint8_t* q, const uint16_t* s, const uint16_t* z, i64 ldq, i64 n0, int rows,
                                   i64 K, i64 Kp, i64 GS, i64 G, vnni_panel& p) {
    const int c = BITS == 8 ? 128 : 0;
    for (int r = 0; r < rows; r++) {
        const uint8_t* row = q + (n0 + r) * ldq;
        int8_t* d = p.w.data() + r * Kp;
        int32_t* gsum = p.gsum.data();  // per group: sum of w' (vector part by vpsadbw on the codes)
        for (i64 g = 0; g < G; g++) gsum[g] = 0;
        i64 j = 0;
        const i64 jv = GS % 64 == 0 ? K - K % 64 : 0;
        for (; j < jv; j += 64) {
            __m512i codes;
            if (BITS == 8) {
                codes = _mm512_loadu_si512((const void*)(row + j));
            } else {
                const __m512i e = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(row + j / 2)));
                const __m512i m = _mm512_set1_epi16(15);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(e, 4), m);
                codes = _mm512_or_si512(_mm512_and_si512(e, m), _mm512_slli_epi16(hi, 8));
            }
            const __m512i wq = BITS == 8 ? _mm512_xor_si512(codes, _mm512_set1_epi8((char)0x80)) : codes;
            _mm512_storeu_si512((void*)(d + j), wq);
            gsum[j / GS] += (int32_t)_mm512_reduce_add_epi64(_mm512_sad_epu8(codes, _mm512_setzero_si512())) - 64 * c;
        }
        for (; j < K; j++) {
            d[j] = (int8_t)((int)q_at<BITS>(row, j) - c);
            gsum[j / GS] += d[j];
        }
        for (; j < Kp; j++) d[j] = 0;
        for (i64 g = 0; g < G; g++) {
            const int32_t sum = gsum[g];
            const float sc = jmoss_k::scalar_load(s + (n0 + r) * G + g);
            const float zp = jmoss_k::scalar_load(z + (n0 + r) * G + g);
            p.a[r * G + g] = sc;
            p.b[r * G + g] = 128 * sum;
            p.e[r * G + g] = sc * ((float)c - zp);
        }
    }
}

// no-tree-pre: with it GCC 12 copies every accumulator around each vpdpbusd and spills half of
// them to the stack (seen in the assembly at -O2/-O3/-Ofast); without it the loop is 2 loads, 12
// broadcasts and 24 vpdpbusd.
template <int PR, int NV, class BT>
__attribute__((optimize("no-tree-pre"))) static void vnni_tile(
        const vnni_panel& p, i64 Kp, i64 G, i64 GS, const uint8_t* xq, const float* xsg, const float* sxv,
        const BT* bias, int act, float* y, i64 N, i64 m0, i64 mrows, i64 n0) {
    // The fp32 totals live in L1 (touched once per group), so the 24 int32 accumulators, two x
    // vectors and the broadcast fit the 32 registers (in registers too, the compiler spilled both).
    alignas(64) float f[PR][NV * 16];
    std::memset(f, 0, sizeof(f));
    __m512i a[PR][NV];
    for (i64 g = 0; g < G; g++) {
        const i64 k4b = g * GS / 4, k4e = std::min(Kp, (g + 1) * GS) / 4;
#pragma GCC unroll 16
        for (int r = 0; r < PR; r++)
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++) a[r][v] = _mm512_setzero_si512();
        for (i64 k4 = k4b; k4 < k4e; k4++) {
            __m512i xv[NV];
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++) xv[v] = _mm512_loadu_si512((const void*)(xq + (k4 * VNNI_MB + v * 16) * 4));
#pragma GCC unroll 16
            for (int r = 0; r < PR; r++) {
                int32_t word;
                std::memcpy(&word, p.w.data() + r * Kp + 4 * k4, 4);
                const __m512i wb = _mm512_set1_epi32(word);
#pragma GCC unroll 2
                for (int v = 0; v < NV; v++) a[r][v] = _mm512_dpbusd_epi32(a[r][v], xv[v], wb);
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < PR; r++) {
            const __m512 av = _mm512_set1_ps(p.a[r * G + g]), ev = _mm512_set1_ps(p.e[r * G + g]);
            const __m512i bv = _mm512_set1_epi32(p.b[r * G + g]);
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++) {
                const __m512 t = _mm512_fmadd_ps(av, _mm512_cvtepi32_ps(_mm512_sub_epi32(a[r][v], bv)),
                                                 _mm512_load_ps(&f[r][v * 16]));
                _mm512_store_ps(&f[r][v * 16], _mm512_fmadd_ps(ev, _mm512_loadu_ps(xsg + g * VNNI_MB + v * 16), t));
            }
        }
    }
    alignas(64) float tmp[PR][NV * 16];
#pragma GCC unroll 16
    for (int r = 0; r < PR; r++) {
        const __m512 bv = _mm512_set1_ps(bias ? jmoss_k::scalar_load(bias + n0 + r) : 0.f);
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) {
            __m512 t = _mm512_fmadd_ps(_mm512_load_ps(&f[r][v * 16]), _mm512_loadu_ps(sxv + v * 16), bv);
            if (act == 1) t = jmoss_k::gelu_new16(t);
            _mm512_store_ps(&tmp[r][v * 16], t);
        }
    }
    for (i64 i = 0; i < mrows; i++)
        for (int r = 0; r < PR; r++) y[(m0 + i) * N + n0 + r] = tmp[r][i];
}

template <int NV, class BT>
static inline void vnni_tile_rows(int pr, const vnni_panel& p, i64 Kp, i64 G, i64 GS, const uint8_t* xq,
                                  const float* xsg, const float* sxv, const BT* bias, int act, float* y, i64 N,
                                  i64 m0, i64 mrows, i64 n0) {
    switch (pr) {
#define JMOSS_VNNI_CASE(R) \
        case R: vnni_tile<R, NV>(p, Kp, G, GS, xq, xsg, sxv, bias, act, y, N, m0, mrows, n0); break;
        JMOSS_VNNI_CASE(1) JMOSS_VNNI_CASE(2) JMOSS_VNNI_CASE(3) JMOSS_VNNI_CASE(4) JMOSS_VNNI_CASE(5)
        JMOSS_VNNI_CASE(6) JMOSS_VNNI_CASE(7) JMOSS_VNNI_CASE(8) JMOSS_VNNI_CASE(9) JMOSS_VNNI_CASE(10)
        JMOSS_VNNI_CASE(11)
#undef JMOSS_VNNI_CASE
        default: vnni_tile<VNNI_PR, NV>(p, Kp, G, GS, xq, xsg, sxv, bias, act, y, N, m0, mrows, n0); break;
    }
}

// Row m (through perm) quantized into block slot i: qx bytes in xq [Kp/4][VNNI_MB][4], its group
// sums of (qx - 128) in xsg [G][VNNI_MB], its scale in sxv[i]. Rows past M: all 128 (they add 0).
// xp: a scratch of Kp + 16 floats. Rounding is to nearest even (vcvtps2dq), as nearbyint.
static inline void vnni_quantize_row(const float* xr, const int32_t* perm, i64 K, i64 Kp, i64 GS, i64 G, int i,
                                     bool real, uint8_t* xq, float* xsg, float* sxv, float* xp) {
    __m512 amax = _mm512_setzero_ps();
    i64 k = 0;
    if (real) {
        for (; k < K; k++) xp[k] = xr[perm ? perm[k] : k];
        for (i64 t = 0; t < K; t += 16) {
            const __mmask16 m = K - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - t)) - 1);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, xp + t)));
        }
    }
    for (; k < Kp + 16; k++) xp[k] = 0.f;
    const float mx = _mm512_reduce_max_ps(amax);
    const float sx = mx > 0.f ? mx / 127.0f : 1.0f, inv = mx > 0.f ? 127.0f / mx : 0.f;
    sxv[i] = sx;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (i64 g = 0; g < G; g++) {
        const i64 j0 = g * GS, j1 = std::min(Kp, (g + 1) * GS);
        __m512i sum = _mm512_setzero_si512();
        for (i64 t = j0; t < j1; t += 16) {  // j1 - t is a multiple of 4 (GS % 4 == 0, Kp % 4 == 0)
            const i64 cnt = std::min<i64>(16, j1 - t);
            const __mmask16 m = cnt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xp + t), vinv));
            v = _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), v));
            sum = _mm512_add_epi32(sum, v);
            alignas(16) uint32_t words[4];
            _mm_store_si128((__m128i*)words, _mm512_cvtepi32_epi8(_mm512_add_epi32(v, _mm512_set1_epi32(128))));
            for (i64 w4 = 0; w4 < cnt / 4; w4++) std::memcpy(xq + (((t >> 2) + w4) * VNNI_MB + i) * 4, &words[w4], 4);
        }
        xsg[g * VNNI_MB + i] = (float)_mm512_reduce_add_epi32(sum);
    }
}

// A float (fp16 / fp32) weight's panel for the int8 compute mode, quantized on the fly: per
// (row, group of GS) w' = round(w / s) in [-127, 127], s = max|w| / 127 (RTN, what CTranslate2's
// int8 modes do to a float model at load), so it fits vnni_tile as int8 codes with z = c = 128.
// Each weight is off by up to s / 2; the panel is made once per x slab (12 rows x K).
// max |w| over [j0, j1) of a weight row. fp16: on the bits, 32 at a time without converting (for
// finite halves |w| orders as the integer bits & 0x7fff); fp32: converted lanes.
static inline float vnni_group_amax(const uint16_t* row, i64 j0, i64 j1) {
    __m512i m = _mm512_setzero_si512();
    const __m512i mag = _mm512_set1_epi16(0x7fff);
    i64 j = j0;
    for (; j + 32 <= j1; j += 32) m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512((const void*)(row + j)), mag));
    alignas(64) uint16_t lanes[32];
    _mm512_store_si512((void*)lanes, m);
    uint16_t best = 0;
    for (int i = 0; i < 32; i++) best = std::max(best, lanes[i]);
    for (; j < j1; j++) best = std::max<uint16_t>(best, row[j] & 0x7fff);
    return _cvtsh_ss(best);
}

static inline float vnni_group_amax(const float* row, i64 j0, i64 j1) {
    __m512 amax = _mm512_setzero_ps();
    i64 j = j0;
    for (; j + 16 <= j1; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(row + j)));
    float mx = _mm512_reduce_max_ps(amax);
    for (; j < j1; j++) mx = std::max(mx, std::fabs(row[j]));
    return mx;
}

template <class WT>
static inline void vnni_quantize_panel(const WT* w, i64 n0, int rows, i64 K, i64 Kp, i64 GS, i64 G, vnni_panel& p) {
    for (int r = 0; r < rows; r++) {
        const WT* row = w + (n0 + r) * K;
        int8_t* d = p.w.data() + r * Kp;
        for (i64 g = 0; g < G; g++) {
            const i64 j0 = g * GS, j1 = std::min(K, j0 + GS);
            float mx = vnni_group_amax(row, j0, j1);
            const float sc = mx > 0.f ? mx / 127.0f : 1.0f, inv = mx > 0.f ? 127.0f / mx : 0.f;
            const __m512 vinv = _mm512_set1_ps(inv);
            __m512i vsum = _mm512_setzero_si512();
            i64 j = j0;
            for (; j + 16 <= j1; j += 16) {  // |w| <= max|w|: w * inv rounds into [-127, 127], no clamp
                const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(jmoss_k::vload(row + j), vinv));
                vsum = _mm512_add_epi32(vsum, v);
                _mm_storeu_si128((__m128i*)(d + j), _mm512_cvtepi32_epi8(v));
            }
            int32_t sum = _mm512_reduce_add_epi32(vsum);
            for (; j < j1; j++) {
                const int v = std::max(-127, std::min(127, (int)std::nearbyint(jmoss_k::scalar_load(row + j) * inv)));
                d[j] = (int8_t)v;
                sum += v;
            }
            p.a[r * G + g] = sc;
            p.b[r * G + g] = 128 * sum;
            p.e[r * G + g] = 0.f;
        }
        for (i64 j = K; j < Kp; j++) d[j] = 0;
    }
}

template <int BITS>
struct vnni_packed_maker {  // store format 2 rows -> vnni_panel (exact: the codes as they are)
    const uint8_t* q;
    const uint16_t* s;
    const uint16_t* z;
    i64 ldq;
    void operator()(i64 n0, int rows, i64 K, i64 Kp, i64 GS, i64 G, vnni_panel& p) const {
        vnni_make_panel<BITS>(q, s, z, ldq, n0, rows, K, Kp, GS, G, p);
    }
};

template <class WT>
struct vnni_float_maker {
    const WT* w;
    void operator()(i64 n0, int rows, i64 K, i64 Kp, i64 GS, i64 G, vnni_panel& p) const {
        vnni_quantize_panel<WT>(w, n0, rows, K, Kp, GS, G, p);
    }
};

template <class Maker, class BT>
static void linear_vnni(const float* x, const int32_t* perm, const Maker& make, const BT* bias, float* y, i64 M,
                        i64 K, i64 N, i64 GS, int threads, int act) {
    const i64 G = (K + GS - 1) / GS, Kp = (K + 3) / 4 * 4;
    const i64 npanels = (N + VNNI_PR - 1) / VNNI_PR;
    if (threads < 1) threads = 1;
    if (threads > npanels) threads = (int)std::max<i64>(1, npanels);
    const i64 block_bytes = VNNI_MB * (Kp + 4 * G + 4);
    const i64 slab_blocks = std::max<i64>(1, (768 * 1024) / block_bytes);
    const i64 nblocks_all = (M + VNNI_MB - 1) / VNNI_MB, sb = std::min(slab_blocks, nblocks_all);
    static thread_local std::vector<uint8_t> xq_buf;
    static thread_local std::vector<float> xs_buf;
    // 64-byte aligned: the tile's 64-byte loads of xq and xsg split a cache line each otherwise, and
    // where malloc happened to put these (heap state differs run to run) swung a 350M fp16 prefill
    // between 96 and 125 ms.
    uint8_t* xq = jmoss_k::aligned64(xq_buf, sb * VNNI_MB * Kp);
    float* xs = jmoss_k::aligned64(xs_buf, sb * VNNI_MB * (G + 1));
    for (i64 s0 = 0; s0 < M; s0 += sb * VNNI_MB) {
        const i64 srows = std::min(sb * VNNI_MB, M - s0), nblocks = (srows + VNNI_MB - 1) / VNNI_MB;
#pragma omp parallel num_threads(threads)
        {
            static thread_local vnni_panel p;
            if ((i64)p.w.size() < VNNI_PR * Kp) p.w.resize(VNNI_PR * Kp);
            if ((i64)p.a.size() < VNNI_PR * G) {
                p.a.resize(VNNI_PR * G);
                p.b.resize(VNNI_PR * G);
                p.e.resize(VNNI_PR * G);
                p.gsum.resize(G);
            }
            static thread_local std::vector<float> xp;
            float* xpa = jmoss_k::aligned64(xp, Kp + 16);
#pragma omp for schedule(dynamic, 4)
            for (i64 m = 0; m < nblocks * VNNI_MB; m++) {
                const i64 b = m / VNNI_MB;
                float* xb = xs + b * VNNI_MB * (G + 1);
                vnni_quantize_row(x + (s0 + m) * K, perm, K, Kp, GS, G, (int)(m % VNNI_MB), m < srows,
                                  xq + b * VNNI_MB * Kp, xb + VNNI_MB, xb, xpa);
            }
            // implicit barrier: the slab is quantized before any panel reads it
#pragma omp for schedule(dynamic, 1)
            for (i64 pi = 0; pi < npanels; pi++) {
                const i64 n0 = pi * VNNI_PR;
                const int pr = (int)std::min<i64>(VNNI_PR, N - n0);
                make(n0, pr, K, Kp, GS, G, p);
                for (i64 b = 0; b < nblocks; b++) {
                    const i64 m0 = b * VNNI_MB, mrows = std::min<i64>(VNNI_MB, srows - m0);
                    const float* xb = xs + b * VNNI_MB * (G + 1);
                    if (mrows > 16)
                        vnni_tile_rows<2>(pr, p, Kp, G, GS, xq + b * VNNI_MB * Kp, xb + VNNI_MB, xb, bias, act,
                                          y + s0 * N, N, m0, mrows, n0);
                    else
                        vnni_tile_rows<1>(pr, p, Kp, G, GS, xq + b * VNNI_MB * Kp, xb + VNNI_MB, xb, bias, act,
                                          y + s0 * N, N, m0, mrows, n0);
                }
            }
        }
    }
}
template <int BITS, class BT>
static void qlinear_vnni(const float* x, const int32_t* perm, const uint8_t* q, const uint16_t* s, const uint16_t* z,
                         const BT* bias, float* y, i64 M, i64 K, i64 N, i64 ldq, i64 GS, int threads, int act) {
    linear_vnni(x, perm, vnni_packed_maker<BITS>{q, s, z, ldq}, bias, y, M, K, N, GS, threads, act);
}
#else
#define JMOSS_VNNI 0
#endif

// Float-weight linear for the entry points (Python linear and the fused decode layer): the int8
// compute mode where it applies (i8, VNNI, M >= QUANT_GEMM_MIN_M), else jmoss_k::linear.
static const i64 VNNI_FLOAT_GS = 128;
template <class WT, class BT>
static void flinear(const float* x, const WT* w, const BT* bias, float* y, i64 M, i64 K, i64 N, int threads, int act,
                    int amx_min_m, int i8) {
#if JMOSS_VNNI
    if (i8 && M >= jmoss_k::QUANT_GEMM_MIN_M) {
        linear_vnni(x, (const int32_t*)nullptr, vnni_float_maker<WT>{w}, bias, y, M, K, N, VNNI_FLOAT_GS, threads, act);
        return;
    }
#endif
    (void)i8;
    jmoss_k::linear(x, w, bias, y, M, K, N, threads, act, amx_min_m);
}

// Whether every perm[j] is in [0, K). A store's perms are checked before any kernel sees them
// (jmoss.store_check); this O(K) test per call, outside the loops over N, keeps a perm that
// changed on disk after that check (a streamed layer is re-read every token) from indexing
// outside x: the layer's output is NaN instead.
static inline bool perm_in_range(const int32_t* perm, i64 K) {
    uint32_t bad = 0;
    for (i64 j = 0; j < K; j++) bad |= (uint32_t)((uint32_t)perm[j] >= (uint64_t)K);
    return bad == 0;
}

template <int BITS, class BT>
static void qlinear(const float* x, const int32_t* perm, const uint8_t* q, const uint16_t* s, const uint16_t* z,
                    const BT* bias, float* y, i64 M, i64 K, i64 N, i64 ldq, i64 GS, int threads, int act, int i8 = 0) {
    if (GS < 1 || (perm && !perm_in_range(perm, K))) {
        std::fill(y, y + M * N, std::numeric_limits<float>::quiet_NaN());
        return;
    }
    const i64 G = (K + GS - 1) / GS;
#if JMOSS_VNNI
    if (i8 && M >= jmoss_k::QUANT_GEMM_MIN_M && GS % 4 == 0) {
        qlinear_vnni<BITS>(x, perm, q, s, z, bias, y, M, K, N, ldq, GS, threads, act);
        return;
    }
#endif
#if JMOSS_ISA >= 1
    if (M >= jmoss_k::QUANT_GEMM_MIN_M) {
        gemm_panels_q<BITS>(x, perm, q, s, z, bias, y, M, K, N, ldq, GS, threads, act);
        return;
    }
#endif
    // x through the permutation, and per-group sums for the zero-point term (M x K, M x G: small).
    // x through perm (64-byte aligned: the GEMV's vector loads of it never split a line)
    static thread_local std::vector<float> xbuf_v, xr_v;
    float* xbuf = jmoss_k::aligned64(xbuf_v, M * K);
    std::vector<float> xsum(M * G, 0.f);
    for (i64 m = 0; m < M; m++)
        for (i64 j = 0; j < K; j++) xbuf[m * K + j] = x[m * K + perm[j]];
    for (i64 m = 0; m < M; m++)
        for (i64 j = 0; j < K; j++) xsum[m * G + j / GS] += xbuf[m * K + j];
    const bool panel = M >= QUANT_PANEL_MIN_M;
    const float* xp = xbuf;
#if JMOSS_ISA >= 1
    if (BITS == 4 && GS % Q4B == 0 && !panel) {  // qdot4 reads x deinterleaved per block
        float* xr = jmoss_k::aligned64(xr_v, M * K);
        for (i64 m = 0; m < M; m++) q4_deinterleave(xbuf + m * K, K, xr + m * K);
        xp = xr;
    }
#endif
    const float* xs = xsum.data();
    const i64 CHUNK = 32;
    const i64 nchunks = (N + CHUNK - 1) / CHUNK;
    if (threads < 1) threads = 1;
    if (threads > nchunks) threads = (int)std::max<i64>(1, nchunks);
    const i64 MB = std::max<i64>(4, std::min<i64>(M, (512 * 1024 / 4) / std::max<i64>(K, 1) / 4 * 4));
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> wbuf(panel ? 4 * K : 0);
#pragma omp for schedule(dynamic, 1)
        for (i64 c = 0; c < nchunks; c++) {
            const i64 n_begin = c * CHUNK, n_end = std::min(N, n_begin + CHUNK);
            for (i64 n0 = n_begin; n0 < n_end; n0 += 4) {
                const int nr = (int)std::min<i64>(4, n_end - n0);
                if (!panel) {
                    switch (nr) {
                        case 4: qgemv_rows<BITS, 4>(xp, xs, q, ldq, s, z, y, M, n0, G, K, N, GS); break;
                        case 3: qgemv_rows<BITS, 3>(xp, xs, q, ldq, s, z, y, M, n0, G, K, N, GS); break;
                        case 2: qgemv_rows<BITS, 2>(xp, xs, q, ldq, s, z, y, M, n0, G, K, N, GS); break;
                        default: qgemv_rows<BITS, 1>(xp, xs, q, ldq, s, z, y, M, n0, G, K, N, GS); break;
                    }
                    continue;
                }
                float* w = wbuf.data();
                dequant_panel<BITS>{q, s, z, K, ldq, GS, G}(n0, nr, w);
                // y + n0 as the output base: the tile writes column n0 + jj of row m.
                for (i64 mb = 0; mb < M; mb += MB) {
                    const i64 me = std::min(M, mb + MB);
                    i64 m0 = mb;
                    for (; m0 + 4 <= me; m0 += 4) jmoss_k::tile_nr<4>(xp, (const float*)w, y + n0, m0, 0, nr, K, N);
                    if (m0 < me) jmoss_k::tile_any(xp, (const float*)w, y + n0, m0, (int)(me - m0), 0, nr, K, N);
                }
            }
            if (bias || act) {
                for (i64 m = 0; m < M; m++) {
                    float* row = y + m * N;
                    if (bias)
                        for (i64 n = n_begin; n < n_end; n++) row[n] += jmoss_k::scalar_load(bias + n);
                    if (act == 1) jmoss_k::gelu_row(row + n_begin, n_end - n_begin);
                }
            }
        }
    }
}
}  // namespace jmoss_q

static inline const uint8_t* jmoss_u8(const uint8_t* p) { return p; }
static inline const uint8_t* jmoss_u8(const int8_t* p) { return reinterpret_cast<const uint8_t*>(p); }

// 1 when the opt-in int8 (VNNI) prefill compute mode is compiled in (AVX-512 VNNI + BW).
static inline int jmoss_vnni_ready() {
#if JMOSS_VNNI
    return 1;
#else
    return 0;
#endif
}

// ------------------------------------------------------------------------------------------
// A whole decoder layer for a few rows (decode: M = B*T <= FUSED_MAX_ROWS) in one op.
//
// The same kernels the per-op path calls, in the same order and precision (LayerNorm, qkv,
// rotary_split, the cache write, attention, out_proj, fc_in + gelu_new, fc_out, then
// (attn + mlp) + h), so the two paths agree to the last bit the compiler allows. What it
// saves is the ~12 jittor ops a layer costs otherwise (graph building and dispatch, ~20 us
// each): a 350M-shape decode step on 2 cores, same process, interleaved, went from 21.7 to
// 14.5 ms (int4), 29.6 to 24.3 (int8), 32.6 to 29.0 (fp16). keys/values are
// the layer's static cache [B, H, L, Dh], written in place at [start, start + T) like the
// per-op path's setitem. Scratch rows live in per-thread vectors sized for M rows (tiny).
namespace jmoss_f {
using jmoss_k::i64;

template <int BITS, class PT>
struct lin {  // BITS 0: fp16 weight [N, K] in w; 4 / 8: packed parts (qweight in w) of store format 2
    const void* w;
    const int32_t* perm;
    const uint16_t* s;
    const uint16_t* z;
    const PT* bias;
    i64 K, N, ldq, GS;
    void operator()(const float* x, float* y, i64 M, int act, int threads, int amx, int i8) const {
        if (BITS == 0)
            jmoss_q::flinear(x, (const uint16_t*)w, bias, y, M, K, N, threads, act, amx, i8);
        else
            jmoss_q::qlinear<BITS == 0 ? 8 : BITS>(x, perm, (const uint8_t*)w, s, z, bias, y, M, K, N, ldq, GS, threads,
                                                   act, i8);
    }
};

template <int BITS, class PT>
static void decode_block(const float* h, float* hout, const PT* ln_w, const PT* ln_b, float eps,
                         const lin<BITS, PT>& qkv, const lin<BITS, PT>& out_proj, const lin<BITS, PT>& fc_in,
                         const lin<BITS, PT>& fc_out, const float* sn, const float* cs, const float* mask,
                         float* keys, float* values, i64 B, i64 T, i64 H, i64 Dh, i64 L, i64 start, i64 R,
                         int threads, int amx, int i8) {
    const i64 M = B * T, D = H * Dh, S = start + T, F = fc_in.N;
    static thread_local std::vector<float> buf;
    float* a = jmoss_k::aligned64(buf, M * (D + 3 * D + D + 2 * D + D + D + F + D));
    float* qkvb = a + M * D;
    float* q = qkvb + 3 * M * D;
    float* kv = q + M * D;  // k [B, H, T, Dh] then v
    float* ctx = kv + 2 * M * D;
    float* attn = ctx + M * D;
    float* f = attn + M * D;
    float* mlp = f + M * F;
    jmoss_k::layer_norm(h, ln_w, ln_b, a, M, D, eps, threads);
    qkv(a, qkvb, M, 0, threads, amx, i8);
    jmoss_k::rotary_split(qkvb, sn, cs, q, kv, kv + M * D, B, T, H, Dh, R);
    for (i64 bh = 0; bh < B * H; bh++)
        for (i64 t = 0; t < T; t++) {
            std::memcpy(keys + (bh * L + start + t) * Dh, kv + (bh * T + t) * Dh, Dh * sizeof(float));
            std::memcpy(values + (bh * L + start + t) * Dh, kv + M * D + (bh * T + t) * Dh, Dh * sizeof(float));
        }
    jmoss_k::attention(q, keys, values, mask, ctx, B, T, H, Dh, L, S, threads);
    out_proj(ctx, attn, M, 0, threads, amx, i8);
    fc_in(a, f, M, 1, threads, amx, i8);
    fc_out(f, mlp, M, 0, threads, amx, i8);
    for (i64 i = 0; i < M * D; i++) hout[i] = (attn[i] + mlp[i]) + h[i];
}
}  // namespace jmoss_f
