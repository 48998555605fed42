// Packed and float weights at prefill in the opt-in int8 compute mode (AVX-512 VNNI vpdpbusd).
namespace jmoss_q {
using jmoss_k::i64;

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
    const i64 QROWS = 4;  // x rows quantized per chunk
    for (i64 s0 = 0; s0 < M; s0 += sb * VNNI_MB) {
        const i64 srows = std::min(sb * VNNI_MB, M - s0), nblocks = (srows + VNNI_MB - 1) / VNNI_MB;
        // The slab of x quantized first (a job of its own: every panel reads all of it).
        jmoss_pool::parallel_for(threads, nblocks * VNNI_MB / QROWS, [&](i64 c) {
            static thread_local std::vector<float> xp;
            float* xpa = jmoss_k::aligned64(xp, Kp + 16);
            for (i64 m = c * QROWS; m < (c + 1) * QROWS; m++) {
                const i64 b = m / VNNI_MB;
                float* xb = xs + b * VNNI_MB * (G + 1);
                vnni_quantize_row(x + (s0 + m) * K, perm, K, Kp, GS, G, (int)(m % VNNI_MB), m < srows,
                                  xq + b * VNNI_MB * Kp, xb + VNNI_MB, xb, xpa);
            }
        });
        jmoss_pool::parallel_for(threads, npanels, [&](i64 pi) {
            static thread_local vnni_panel p;
            if ((i64)p.w.size() < VNNI_PR * Kp) p.w.resize(VNNI_PR * Kp);
            if ((i64)p.a.size() < VNNI_PR * G) {
                p.a.resize(VNNI_PR * G);
                p.b.resize(VNNI_PR * G);
                p.e.resize(VNNI_PR * G);
            }
            if ((i64)p.gsum.size() < G) p.gsum.resize(G);
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
        });
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
}  // namespace jmoss_q
