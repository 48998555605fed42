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

// Weight rows a thread claims at a time in the packed GEMVs (qlinear, qlinear_q8). The tiles
// prefetch a few 4-row sets ahead (Q4_PF, Q8_PF4_SETS), which lands in the next chunk: at one
// thread that is the next one it computes, but at two a chunk's first sets were never prefetched
// (the thread's next chunk is claimed later, the line ahead is the other thread's), a quarter of
// a 32-row chunk. So chunks are long, up to 256 rows, while each thread still gets ~8 of them to
// balance and a descheduled thread loses only its own. MOSS-16B int4 shapes, 2 threads, int8
// compute mode, 32 -> 128 rows: fc_in 3.84 -> 3.50 ms, qkv 2.81 -> 2.56, fc_out 3.54 -> 3.36
// (fp32 mode fc_in 4.76 -> 4.57); 128 -> 256: fc_in 3.28 -> 3.14; 1 thread unchanged (Xeon VM,
// interleaved runs).
static inline i64 qgemv_chunk(i64 N, int threads) {
    return std::max<i64>(32, std::min<i64>(256, N / (8 * std::max(1, threads)) / 8 * 8));  // whole 8-row tiles
}

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

}  // namespace jmoss_q
