// jmoss CPU kernels: y[M,N] = act(x[M,K] . W[N,K]^T + b[N]) with fp16 or fp32 weights.
//
// This text is handed to jt.code as `cpu_header` by kernels/cpu.py (it is read as a string, so
// the kernel cache key follows its content). Jittor compiles it with `-march=native -fopenmp
// -Ofast`, so the ISA path is chosen at compile time from the predefined macros:
//
//   avx512   __AVX512F__ (16 lanes; the K % 16 tail is scalar on every path)
//   avx2     __AVX2__ && __FMA__ && __F16C__
//   portable anything else, or JMOSS_FORCE_PORTABLE defined (tests check both paths agree)
//
// Why the shape of the code: batch-1 decode is a stream of GEMVs whose cost is reading W once, so
// the GEMV path must run at memory speed: threads take 32-row chunks of W (long sequential
// runs, software-prefetched), four rows at a time share each load of x, fp16 is widened with
// vcvtph2ps straight into FMAs, and accumulation is fp32. Prefill (M > 1) uses the same dot-product micro-kernel with a 4x4
// register tile (4 rows of x times 4 rows of W) so every converted weight vector feeds 4 FMAs and
// every x vector 4 more; the 4 weight rows (<= 8 KiB per 1024 of K) stay in L1 while the m-tiles
// sweep past them. Nothing is allocated here: the output buffer is jittor's, everything else is
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
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <omp.h>
#include "type/fp16_compute.h"  // jittor::float16, the element type jittor hands us for fp16 Vars

#if defined(JMOSS_FORCE_PORTABLE)
#define JMOSS_ISA 0
#elif defined(__AVX512F__)
#define JMOSS_ISA 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JMOSS_ISA 1
#else
#define JMOSS_ISA 0
#endif

namespace jmoss_k {

typedef int64_t i64;

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
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) a[i][j] = vzero();
    const i64 Kv = K - K % VW;
    for (i64 k = 0; k < Kv; k += VW) {
        if (MR == 1) {
            // Decode streams each weight row once: ask for it ~2-4 KiB ahead so the NR row
            // streams keep enough misses in flight (measured +5-15% GB/s over the hardware
            // prefetcher alone on this 2-core VM). Prefetching past the end is harmless.
            for (int j = 0; j < NR; j++) _mm_prefetch((const char*)(w + j * ldw + k + 1024), _MM_HINT_T0);
        }
        vec wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = vload(w + j * ldw + k);
        for (int i = 0; i < MR; i++) {
            vec xv = vload(x + i * ldx + k);
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

// Output columns (rows of W) are handed out in chunks of CHUNK rows from a shared counter
// (OpenMP dynamic schedule): each chunk is a long sequential run of weights, and on a shared
// machine a thread that loses its core does not hold the whole op back as a static split would.
// Bias and activation are applied per chunk right after it is computed, while it is in cache.
template <class WT, class BT>
static void linear(const float* x, const WT* w, const BT* bias, float* y, i64 M, i64 K, i64 N, int threads,
                   int act) {
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
#pragma omp simd
                    for (i64 n = n_begin; n < n_end; n++) row[n] = gelu_new(row[n]);
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

// softmax(q . K^T / sqrt(Dh) + bias) . V for every (batch, head, query), reading the static cache
// [B, H, L, Dh] in place over its first S = start + T slots (no [B, H, S, Dh] slice is copied).
// bias [B, T, S] is the additive causal/padding mask (0 or float32's minimum). Output rows are
// head-merged [B*T, H*Dh], i.e. what out_proj reads. Scores use a per-thread scratch of S floats.
static void attention(const float* q, const float* keys, const float* values, const float* bias, float* ctx,
                      i64 B, i64 T, i64 H, i64 Dh, i64 L, i64 S, int threads) {
    const i64 Dm = H * Dh;
    const float root = std::sqrt((float)Dh);
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
            const float* br = bias + (bb * T + t) * S;
            float mx = -3.0e38f;
            for (i64 j = 0; j < S; j++) {
                const float* kr = kb + j * Dh;
                float d = 0.f;
#pragma omp simd reduction(+ : d)
                for (i64 e = 0; e < Dh; e++) d += qr[e] * kr[e];
                sc[j] = d / root + br[j];
                mx = std::max(mx, sc[j]);
            }
            float total = 0.f;
            for (i64 j = 0; j < S; j++) {
                // Masked scores sit ~3.4e38 below the max: exactly 0, as in the reference (and
                // -Ofast assumes no infinities, so expf never sees them).
                const float z = sc[j] - mx;
                sc[j] = z < -87.0f ? 0.0f : expf(z);
                total += sc[j];
            }
            const float inv = 1.0f / total;
            float* o = ctx + (bb * T + t) * Dm + h * Dh;
            for (i64 e = 0; e < Dh; e++) o[e] = 0.f;
            for (i64 j = 0; j < S; j++) {
                const float p = sc[j] * inv;
                const float* vr = vb + j * Dh;
#pragma omp simd
                for (i64 e = 0; e < Dh; e++) o[e] += p * vr[e];
            }
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
