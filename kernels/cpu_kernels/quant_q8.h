// Packed int4 / int8 weights at decode (M < QUANT_GEMM_MIN_M rows) in the opt-in int8 compute mode
// (quant_compute="int8"), AVX2 (AVX-512 builds run the same code, except int4's 4-row tile, which
// has an AVX-512 VNNI form, q8_tile4x_vnni, where the CPU offers it).
//
// Why: the fp32 GEMV (quant_gemv.h) widens every code to fp32 and FMAs it, 4+ instructions per
// 8 codes per x row, so on a core without AVX-512 it is compute-bound (int4 ~12 GB/s of weights
// against a 29-37 GB/s read probe on a 2-vCPU EPYC), and a pass over 2-8 rows (lookup's verify
// pass) costs ~2-6 one-row passes. Here x is quantized to 8 bits per block of Q8_BLOCK = 32
// consecutive (permuted) positions and row, and the products are integer: vpmaddubsw (32 u8 x s8
// products summed in pairs to int16) then vpmaddwd with ones (pairs to int32), one fp32 FMA by
// the block scale per 32 or 64 codes; one unpacked weight vector serves several x rows from
// registers (int8: up to 6; int4: up to 8, with 4 weight rows folded into one accumulator,
// q8_tile4x), so extra rows cost only their own few instructions (what llama.cpp's Q4_0 x Q8_0
// dot products do; written here for store format 2's codes, zero points and groups). Measured on
// the 16B fc_in shape (weights in 2 MiB pages), Zen 3, int4 M = 1/2/4/5/8: 1 thread 4.4/6.6/9.8/
// 11.9/17.8 ms (the fp32 GEMV: 14/20-26/49-53/-/76-81), 2 threads 3.1/3.9/5.5/6.5/9.5 ms. An extra
// x row costs ~8-9 cycles per 4-row unit, spread over every vector pipe (vpmaddubsw, the nibble
// shifts, vphaddw); folding with blends or two accumulators, or widening by shifts, measured slower.
//
//   x[m, j] ~ d[m, b] qx[m, j],  qx in [-127, 127],  d[m, b] = max_{j in b} |x[m, j]| / 127
//   W[n, j] = s[n, g] (q[n, j] - z[n, g]) = s (w'[n, j] - z'),  w' = q - c, z' = z - c  (c = 128 int8, 0 int4)
//   sum_j x W ~ sum_g s[n, g] (sum_{b in g} d[m, b] (sum_{j in b} qx w') - z'[n, g] xz[m, g]),
//   xz[m, g] = sum_{b in g} d[m, b] sum_{j in b} qx[m, j]    (made once per call, with qx)
// Per-block (not per-row) scales: LLM activations have outlier channels, and one outlier per row
// would coarsen every other position's step. Each x is off by at most d / 2 = its block's max / 254.
//
// No int16 saturation: int4 codes are u8 0..15, so a vpmaddubsw pair is <= 2 * 15 * 127 and the
// lo + hi nibble sum <= 7620; int8 codes as u8 0..255 would reach 2 * 255 * 127 > 32767, so they go
// as w' = q - 128 in s8 with the sign moved onto x (vpsignb: |w'| * sign(w') qx, |w'| <= 128),
// a pair <= 2 * 128 * 127 = 32512.
//
// Weight units are 32 bytes: 64 int4 codes (two x blocks: the low nibbles hold the even
// positions, the high ones the odd, so qx is stored per unit as [even | odd] bytes and nothing is
// shuffled in registers) or 32 int8 codes (one block). A block never straddles a group: GS % 32 == 0
// (other group sizes keep the exact fp32 GEMV). An int4 unit may (GS % 64 == 32, e.g. GPTQ's g32):
// then its lanes take the two blocks' group scales (SPLIT), folded in per unit instead of per
// group. A K tail shorter than a unit is copied into a zeroed 32-byte buffer (x is 0 past K), so
// no read passes the row.
namespace jmoss_q {
using jmoss_k::i64;

#if JMOSS_ISA >= 1 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JMOSS_Q8 1
static const i64 Q8_BLOCK = 32;
static const int Q8_PF = 4;  // weight row sets prefetched ahead, as q4_prefetch (quant_gemv.h)
// int4 4-row sets prefetched ahead by q8_tile4x, whose prefetch walks the set's bytes in address
// order (one stream of two lines a unit) rather than at each row's column (four streams): measured
// on the 16B fc_in shape, 2 threads, M = 1 3.5-4.1 -> 3.0-3.6 ms
static const int Q8_PF4_SETS = 2;
// int4 x rows per q8_tile4x pass: up to 8 share each unpacked weight vector (5-8 rows are a lookup
// verify pass; splitting them re-reads and re-unpacks every weight row)
static const int Q8_MT4 = 8;

template <int BITS>
static inline bool q8_applies(i64 GS) {
    return GS >= 1 && GS % Q8_BLOCK == 0;
}

// x rows (already through perm: xp [M][K]) quantized into the unit layout the tiles read:
// xq [NU][M][32 * P] bytes (P = 2 for int4: the even then the odd positions of the unit's 64),
// xd [NU][M][8] lane scales (int4: the first block's d in lanes 0-3, the second's in 4-7, the
// lanes vpmaddwd leaves each block's sums in; int8: d in all 8), xz [M][G] as in the algebra above.
// Rounding is to nearest even (vcvtps2dq); d and 1 / d are computed as the tests' reference does.
template <int BITS>
static void q8_quantize(const float* xp, i64 M, i64 K, i64 GS, i64 G, i64 NU, int8_t* xq, float* xd, float* xz) {
    constexpr int P = BITS == 4 ? 2 : 1;
    constexpr i64 UC = 32 * P;  // positions per unit
    for (i64 m = 0; m < M; m++) {
        const float* xr = xp + m * K;
        float* z = xz + m * G;
        for (i64 g = 0; g < G; g++) z[g] = 0.f;
        for (i64 u = 0; u < NU; u++) {
            alignas(32) int8_t qb[UC];
            float* dv = xd + (u * M + m) * 8;
            for (int h = 0; h < P; h++) {
                const i64 j0 = u * UC + h * Q8_BLOCK, n = std::max<i64>(0, std::min<i64>(Q8_BLOCK, K - j0));
                alignas(32) float xb[Q8_BLOCK];
                for (i64 i = 0; i < Q8_BLOCK; i++) xb[i] = i < n ? xr[j0 + i] : 0.f;
                const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
                __m256 amax = _mm256_setzero_ps();
                for (int i = 0; i < Q8_BLOCK; i += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_load_ps(xb + i), absmask));
                __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
                a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
                a4 = _mm_max_ss(a4, _mm_shuffle_ps(a4, a4, 1));
                const float mx = _mm_cvtss_f32(a4);
                const float d = mx * (1.0f / 127.0f), inv = mx > 0.f ? 127.0f / mx : 0.f;
                const __m256 vinv = _mm256_set1_ps(inv);
                __m256i sum = _mm256_setzero_si256();
                for (int i = 0; i < Q8_BLOCK; i += 8) {  // |x| <= mx: x * inv rounds into [-127, 127]
                    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(xb + i), vinv));
                    sum = _mm256_add_epi32(sum, v);
                    alignas(32) int32_t w[8];
                    _mm256_store_si256((__m256i*)w, v);
                    for (int t = 0; t < 8; t++) qb[h * Q8_BLOCK + i + t] = (int8_t)w[t];
                }
                alignas(32) int32_t sv[8];
                _mm256_store_si256((__m256i*)sv, sum);
                const int32_t bsum = sv[0] + sv[1] + sv[2] + sv[3] + sv[4] + sv[5] + sv[6] + sv[7];
                if (n > 0) z[j0 / GS] += d * (float)bsum;
                for (int l = 0; l < 8 / P; l++) dv[h * (8 / P) + l] = d;
            }
            int8_t* dst = xq + (u * M + m) * UC;
            if (BITS == 4) {
                // byte i of a unit holds positions 2i (low nibble) and 2i + 1 (high): bytes 0-15 the
                // first block, 16-31 the second, each half of a 256-bit lane pairing up in vpmaddubsw
                for (int i = 0; i < 32; i++) {
                    dst[i] = qb[2 * i];
                    dst[32 + i] = qb[2 * i + 1];
                }
            } else {
                std::memcpy(dst, qb, UC);
            }
        }
    }
}

// NR weight rows' K tail (the bytes past their nfull whole 32-byte units), each copied into a zeroed
// 32-byte buffer so the tiles read whole units and no read passes the row (x is 0 there).
template <int BITS, int NR>
static inline void q8_tail(const uint8_t* q, i64 ldq, i64 K, i64 NU, i64 nfull, uint8_t (*tail)[32]) {
    if (nfull == NU) return;
    const i64 have = (K * BITS + 7) / 8 - nfull * 32;
    for (int r = 0; r < NR; r++) {
        std::memset(tail[r], 0, 32);
        std::memcpy(tail[r], q + r * ldq + nfull * 32, (size_t)have);
    }
}

// NR weight rows x MT x rows (from m0) over all K: res[r][i] = the sum over groups before the
// zero-point term. Accumulators: per (row, x row) one for the group and one for the total.
template <int BITS, int NR, int MT, bool SPLIT>
static inline void q8_tile(const uint8_t* q, i64 ldq, const uint16_t* s, i64 G, i64 GS, i64 K, i64 NU, i64 nfull,
                           const int8_t* xq, const float* xd, i64 M, i64 m0, float res[NR][MT]) {
    constexpr int P = BITS == 4 ? 2 : 1;
    constexpr i64 UC = 32 * P;
    const i64 UG = SPLIT ? 1 : GS / UC;  // units per segment: a group, or one unit (SPLIT)
    const i64 nseg = SPLIT ? NU : G;
    alignas(32) uint8_t tail[NR][32];
    q8_tail<BITS, NR>(q, ldq, K, NU, nfull, tail);
    const __m256i ones = _mm256_set1_epi16(1), m15 = _mm256_set1_epi8(15), flip = _mm256_set1_epi8((char)0x80);
    __m256 tot[NR][MT];
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 8
        for (int i = 0; i < MT; i++) tot[r][i] = _mm256_setzero_ps();
    for (i64 g = 0; g < nseg; g++) {
        const i64 u0 = g * UG, u1 = std::min(NU, u0 + UG);
        __m256 acc[NR][MT];
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++)
#pragma GCC unroll 8
            for (int i = 0; i < MT; i++) acc[r][i] = _mm256_setzero_ps();
        for (i64 u = u0; u < u1; u++) {
            const int8_t* xu = xq + (u * M + m0) * UC;
            const float* du = xd + (u * M + m0) * 8;
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) {
                _mm_prefetch((const char*)(q + r * ldq + u * 32 + Q8_PF * NR * ldq), _MM_HINT_T0);
                const __m256i wv = u < nfull ? _mm256_loadu_si256((const __m256i*)(q + r * ldq + u * 32))
                                             : _mm256_load_si256((const __m256i*)tail[r]);
                if (BITS == 4) {
                    const __m256i lo = _mm256_and_si256(wv, m15);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m15);
#pragma GCC unroll 8
                    for (int i = 0; i < MT; i++) {
                        const __m256i a = _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i*)(xu + i * UC)));
                        const __m256i b = _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i*)(xu + i * UC + 32)));
                        const __m256i p = _mm256_madd_epi16(_mm256_add_epi16(a, b), ones);
                        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_load_ps(du + i * 8), acc[r][i]);
                    }
                } else {
                    const __m256i ws = _mm256_xor_si256(wv, flip);  // w' = q - 128 as s8
                    const __m256i aw = _mm256_sign_epi8(ws, ws);    // |w'| (128 stays 0x80 = 128 as u8)
#pragma GCC unroll 8
                    for (int i = 0; i < MT; i++) {
                        const __m256i xs = _mm256_sign_epi8(_mm256_load_si256((const __m256i*)(xu + i * UC)), ws);
                        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);
                        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_load_ps(du + i * 8), acc[r][i]);
                    }
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < NR; r++) {
            __m256 sv;
            if (SPLIT) {  // the unit's two blocks (lanes 0-3, 4-7) may lie in two groups
                const float s0 = jmoss_k::scalar_load(s + r * G + g * UC / GS);
                const float s1 = jmoss_k::scalar_load(s + r * G + std::min(G - 1, (g * UC + Q8_BLOCK) / GS));
                sv = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1);
            } else {
                sv = _mm256_set1_ps(jmoss_k::scalar_load(s + r * G + g));
            }
#pragma GCC unroll 8
            for (int i = 0; i < MT; i++) tot[r][i] = _mm256_fmadd_ps(acc[r][i], sv, tot[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MT; i++) {
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(tot[r][i]), _mm256_extractf128_ps(tot[r][i], 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
            res[r][i] = _mm_cvtss_f32(v);
        }
}

// the fp16 scales of 4 weight rows (stride G) at group g as 4 floats, built in registers: 8 floats
// stored one by one and loaded as a vector would stall on store forwarding once per group
static inline __m128 q8_scales4(const uint16_t* s, i64 G, i64 g) {
    __m128i h = _mm_cvtsi32_si128(s[g]);
    h = _mm_insert_epi16(h, s[G + g], 1);
    h = _mm_insert_epi16(h, s[2 * G + g], 2);
    h = _mm_insert_epi16(h, s[3 * G + g], 3);
    return _mm_cvtph_ps(h);
}

// int4, 4 weight rows x MT x rows: each x row's four int16 block sums (one per weight row, lanes
// <= 7620) folded by two vphaddw into one vector (pair sums <= 15240, quads <= 30480: no
// wrap) before the single vpmaddwd, so a unit costs per x row 8 vpmaddubsw + 1 vpmaddwd + 1 FMA for
// four weight rows instead of 8 + 4 + 4: int32 lane l of each 128-bit half = weight row l's sum
// over that half's block, so the block scales keep q8_quantize's lane layout and the group scales
// go in as [s_0..s_3 | s_0..s_3] (SPLIT: the second half's group).
template <int MT, bool SPLIT>
static inline void q8_tile4x(const uint8_t* q, i64 ldq, const uint16_t* s, i64 G, i64 GS, i64 K, i64 NU, i64 nfull,
                             const int8_t* xq, const float* xd, i64 M, i64 m0, float res[4][MT]) {
    constexpr i64 UC = 64;
    const i64 UG = SPLIT ? 1 : GS / UC;
    const i64 nseg = SPLIT ? NU : G;
    alignas(32) uint8_t tail[4][32];
    q8_tail<4, 4>(q, ldq, K, NU, nfull, tail);
    const __m256i ones = _mm256_set1_epi16(1), m15 = _mm256_set1_epi8(15);
    __m256 tot[MT];
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) tot[i] = _mm256_setzero_ps();
    for (i64 g = 0; g < nseg; g++) {
        const i64 u0 = g * UG, u1 = std::min(NU, u0 + UG);
        __m256 acc[MT];
#pragma GCC unroll 8
        for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
        for (i64 u = u0; u < u1; u++) {
            const int8_t* xu = xq + (u * M + m0) * UC;
            const float* du = xd + (u * M + m0) * 8;
            __m256i lo[4], hi[4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                if (r < 2)  // a set's 4 * ldq bytes, 128 a unit: two lines Q8_PF4_SETS sets ahead
                    _mm_prefetch((const char*)(q + Q8_PF4_SETS * 4 * ldq + u * 128 + r * 64), _MM_HINT_T0);
                const __m256i wv = u < nfull ? _mm256_loadu_si256((const __m256i*)(q + r * ldq + u * 32))
                                             : _mm256_load_si256((const __m256i*)tail[r]);
                lo[r] = _mm256_and_si256(wv, m15);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m15);
            }
#pragma GCC unroll 8
            for (int i = 0; i < MT; i++) {
                const __m256i xa = _mm256_load_si256((const __m256i*)(xu + i * UC));
                const __m256i xb = _mm256_load_si256((const __m256i*)(xu + i * UC + 32));
                __m256i sr[4];
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++)
                    sr[r] = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xa), _mm256_maddubs_epi16(hi[r], xb));
                const __m256i t = _mm256_hadd_epi16(_mm256_hadd_epi16(sr[0], sr[1]), _mm256_hadd_epi16(sr[2], sr[3]));
                const __m256i p = _mm256_madd_epi16(t, ones);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_load_ps(du + i * 8), acc[i]);
            }
        }
        const __m128 s_lo = q8_scales4(s, G, SPLIT ? g * UC / GS : g);
        const __m256 sv = _mm256_set_m128(SPLIT ? q8_scales4(s, G, std::min(G - 1, (g * UC + Q8_BLOCK) / GS)) : s_lo, s_lo);
#pragma GCC unroll 8
        for (int i = 0; i < MT; i++) tot[i] = _mm256_fmadd_ps(acc[i], sv, tot[i]);
    }
    for (int i = 0; i < MT; i++) {
        alignas(32) float v[8];
        _mm256_store_ps(v, tot[i]);
        for (int r = 0; r < 4; r++) res[r][i] = v[r] + v[4 + r];
    }
}

#if JMOSS_ISA == 2 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JMOSS_Q8_VNNI 1
// The group scales of 4 weight rows (stride G) as two row-pair vectors: [s0..s3 at g | s0..s3 at g2]
// (g2: SPLIT, the group of the unit's second block) spread to row r in lanes 0-3 (g) and 4-7 (g2),
// row r + 1 in lanes 8-11 and 12-15: s01 for rows 0 and 1, s23 for rows 2 and 3.
static inline void q8_pair_scales(const uint16_t* s, i64 G, i64 g, i64 g2, __m512& s01, __m512& s23) {
    const __m512 a = _mm512_castps256_ps512(_mm256_set_m128(q8_scales4(s, G, g2), q8_scales4(s, G, g)));
    s01 = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 1, 1, 1, 1, 5, 5, 5, 5), a);
    s23 = _mm512_permutexvar_ps(_mm512_setr_epi32(2, 2, 2, 2, 6, 6, 6, 6, 3, 3, 3, 3, 7, 7, 7, 7), a);
}
// The 4-row tiles on AVX-512 VNNI: two weight rows' units side by side in one zmm (rows 0|1, 2|3),
// each x row's unit bytes broadcast to both halves, and vpdpbusd (u8 codes x s8 x, four products
// summed into each int32 lane) in place of vpmaddubsw + vpaddw (+ vphaddw) + vpmaddwd: per unit and
// x row, int4 4 vpdpbusd + 2 converts + 2 FMAs for 4 weight rows (int8: 2 vpdpbusd). int32 lane l
// of a 256-bit half belongs to the half's row and (int4) to block l / 4 (lanes 0-3 the unit's
// first block, 4-7 its second), the lane layout of xd, so the block scale d is applied per lane and
// no horizontal add runs before the end. int8 codes go in as they are (u8 0..255: no saturation in
// int32, so c = 0, not 128, in the zero-point term: q8_zero_c). The group scale is folded into d per
// unit (ds = d x [s_r | s_r+1]), so each x row keeps one accumulator per row pair (8 x rows: 16 zmm)
// and no per-group partial sums.
template <int BITS, int MT, bool SPLIT>
static inline void q8_tile4x_vnni(const uint8_t* q, i64 ldq, const uint16_t* s, i64 G, i64 GS, i64 K, i64 NU,
                                  i64 nfull, const int8_t* xq, const float* xd, i64 M, i64 m0, float res[4][MT]) {
    constexpr i64 UC = BITS == 4 ? 64 : 32;
    alignas(64) uint8_t tail[4][32];
    q8_tail<BITS, 4>(q, ldq, K, NU, nfull, tail);
    const __m512i m15 = _mm512_set1_epi8(15);
    __m512 tot01[MT], tot23[MT];
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) tot01[i] = tot23[i] = _mm512_setzero_ps();
    // one segment a group (SPLIT: a unit), its scales spread once, rather than each unit's group
    // computed as u * UC / GS (perf showed that 64-bit divide in the unit loop; neutral to 5% faster)
    const i64 UG = SPLIT ? 1 : GS / UC, nseg = SPLIT ? NU : (NU + UG - 1) / UG;
    for (i64 sgm = 0; sgm < nseg; sgm++) {
        const i64 u0 = sgm * UG, u1 = std::min(NU, u0 + UG);
        const i64 g = SPLIT ? u0 * UC / GS : sgm, g2 = SPLIT ? std::min(G - 1, (u0 * UC + Q8_BLOCK) / GS) : g;
        __m512 s01, s23;
        q8_pair_scales(s, G, g, g2, s01, s23);
        for (i64 u = u0; u < u1; u++) {
            const int8_t* xu = xq + (u * M + m0) * UC;
            const float* du = xd + (u * M + m0) * 8;
            // the set's 4 * ldq bytes, 128 a unit: two lines Q8_PF4_SETS sets ahead, in address order,
            // into L2 (T1), not L1: on an AVX-512 Xeon (2-vCPU VM) the 16B fc_in shape at 1 thread went
            // from 8.1-9.0 to 6.9-7.7 ms (M = 1) and 9.8-10.0 to 8.5-9.1 ms (M = 4), interleaved runs
            _mm_prefetch((const char*)(q + Q8_PF4_SETS * 4 * ldq + u * 128), _MM_HINT_T1);
            _mm_prefetch((const char*)(q + Q8_PF4_SETS * 4 * ldq + u * 128 + 64), _MM_HINT_T1);
            const uint8_t* r0 = u < nfull ? q + u * 32 : tail[0];
            const uint8_t* r1 = u < nfull ? q + ldq + u * 32 : tail[1];
            const uint8_t* r2 = u < nfull ? q + 2 * ldq + u * 32 : tail[2];
            const uint8_t* r3 = u < nfull ? q + 3 * ldq + u * 32 : tail[3];
            const __m512i w01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)r0)),
                                                   _mm256_loadu_si256((const __m256i*)r1), 1);
            const __m512i w23 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)r2)),
                                                   _mm256_loadu_si256((const __m256i*)r3), 1);
            __m512i lo01 = w01, lo23 = w23, hi01 = w01, hi23 = w23;
            if (BITS == 4) {
                lo01 = _mm512_and_si512(w01, m15);
                hi01 = _mm512_and_si512(_mm512_srli_epi16(w01, 4), m15);
                lo23 = _mm512_and_si512(w23, m15);
                hi23 = _mm512_and_si512(_mm512_srli_epi16(w23, 4), m15);
            }
#pragma GCC unroll 8
            for (int i = 0; i < MT; i++) {
                const __m512i xa = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i*)(xu + i * UC)));
                const __m512 d = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_load_pd((const double*)(du + i * 8))));
                __m512i p01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo01, xa);
                __m512i p23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo23, xa);
                if (BITS == 4) {
                    const __m512i xb = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i*)(xu + i * UC + 32)));
                    p01 = _mm512_dpbusd_epi32(p01, hi01, xb);
                    p23 = _mm512_dpbusd_epi32(p23, hi23, xb);
                }
                tot01[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), _mm512_mul_ps(d, s01), tot01[i]);
                tot23[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), _mm512_mul_ps(d, s23), tot23[i]);
            }
        }
    }
    for (int i = 0; i < MT; i++) {
        alignas(64) float v[32];
        _mm512_store_ps(v, tot01[i]);
        _mm512_store_ps(v + 16, tot23[i]);
        for (int r = 0; r < 4; r++) {
            float t = 0.f;
            for (int l = 0; l < 8; l++) t += v[8 * r + l];
            res[r][i] = t;
        }
    }
}

// int4 decode (one x row) on AVX-512 VNNI: 8 weight rows a pass, q8_tile4x_vnni's arithmetic for
// each row pair unchanged (so every row's result is bit-identical to the 4-row tile's), but each x
// unit is loaded once for 8 rows and 8 row streams are read at once. Measured on a 2-vCPU Xeon VM,
// the 16B shapes, interleaved runs: the tile alone 13.4-13.8 -> 14.3 GB/s at 1 thread (12.9 when
// the next set was prefetched in plain address order, 256 bytes a unit, instead of as two 4-row
// halves); the whole GEMV 1T fc_in 5.83 -> 5.42 ms, fc_out 6.10 -> 5.40, 2T fc_in 3.13 -> 2.83.
template <bool SPLIT>
static inline void q8_tile8x_vnni(const uint8_t* q, i64 ldq, const uint16_t* s, i64 G, i64 GS, i64 K, i64 NU,
                                  i64 nfull, const int8_t* xq, const float* xd, i64 M, i64 m0, float res[8][1]) {
    constexpr i64 UC = 64;
    alignas(64) uint8_t tail[8][32];
    q8_tail<4, 8>(q, ldq, K, NU, nfull, tail);
    const __m512i m15 = _mm512_set1_epi8(15);
    __m512 tot[4];
#pragma GCC unroll 4
    for (int pr = 0; pr < 4; pr++) tot[pr] = _mm512_setzero_ps();
    const i64 UG = SPLIT ? 1 : GS / UC, nseg = SPLIT ? NU : (NU + UG - 1) / UG;
    for (i64 sgm = 0; sgm < nseg; sgm++) {
        const i64 u0 = sgm * UG, u1 = std::min(NU, u0 + UG);
        const i64 g = SPLIT ? u0 * UC / GS : sgm, g2 = SPLIT ? std::min(G - 1, (u0 * UC + Q8_BLOCK) / GS) : g;
        __m512 sc[4];  // row pair pr's scales (rows 0-3, then 4-7)
        q8_pair_scales(s, G, g, g2, sc[0], sc[1]);
        q8_pair_scales(s + 4 * G, G, g, g2, sc[2], sc[3]);
        // one unit of the 8 rows at base, rows stride bytes apart (the rows in place, or the tail copies)
        auto unit = [&](const uint8_t* base, i64 stride, i64 u) __attribute__((always_inline)) {
            const int8_t* xu = xq + (u * M + m0) * UC;
            const __m512i xa = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i*)xu));
            const __m512i xb = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i*)(xu + 32)));
            const __m512 d = _mm512_castpd_ps(
                _mm512_broadcast_f64x4(_mm256_load_pd((const double*)(xd + (u * M + m0) * 8))));
#pragma GCC unroll 4
            for (int pr = 0; pr < 4; pr++) {
                const uint8_t* ra = base + 2 * pr * stride;
                const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)ra)),
                                                     _mm256_loadu_si256((const __m256i*)(ra + stride)), 1);
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, m15), xa);
                p = _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(w, 4), m15), xb);
                tot[pr] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(d, sc[pr]), tot[pr]);
            }
        };
        const i64 ue = std::min(u1, nfull);
        for (i64 u = u0; u < ue; u++) {
            // the next 8-row set into L2, its two 4-row halves (4 * ldq bytes, 128 a unit) each
            // in address order: the same distance ahead as q8_tile4x_vnni's two 4-row sets
            const char* pf = (const char*)(q + 8 * ldq + u * 128);
            _mm_prefetch(pf, _MM_HINT_T1);
            _mm_prefetch(pf + 64, _MM_HINT_T1);
            _mm_prefetch(pf + 4 * ldq, _MM_HINT_T1);
            _mm_prefetch(pf + 4 * ldq + 64, _MM_HINT_T1);
            unit(q + u * 32, ldq, u);
        }
        for (i64 u = std::max(u0, ue); u < u1; u++) unit(tail[0], 32, u);  // the K tail: one unit at most
    }
    alignas(64) float v[64];
#pragma GCC unroll 4
    for (int pr = 0; pr < 4; pr++) _mm512_store_ps(v + 16 * pr, tot[pr]);
    for (int r = 0; r < 8; r++) {
        float t = 0.f;
        for (int l = 0; l < 8; l++) t += v[8 * r + l];
        res[r][0] = t;
    }
}
#else
#define JMOSS_Q8_VNNI 0
#endif

// sum_g s[g] (z[g] - c) xz[g] for one weight row (sz: that row's s (z - c), made once per row).
static inline void q8_zero_factors(const uint16_t* s, const uint16_t* z, i64 G, float c, float* sz) {
    i64 g = 0;
    const __m256 cv = _mm256_set1_ps(c);
    for (; g + 8 <= G; g += 8)
        _mm256_storeu_ps(sz + g, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + g))),
                                               _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(z + g))), cv)));
    for (; g < G; g++) sz[g] = jmoss_k::scalar_load(s + g) * (jmoss_k::scalar_load(z + g) - c);
}

// One x row's zero-point term for one weight row in a single pass, sum_g s[g] (z[g] - c) xz[g],
// each product formed as q8_zero_factors then q8_dot_g form it (s (z - c), times xz), a vector of
// groups a step. Decode (one x row) takes this: storing the factors and reading them back took
// ~70 instructions a row against ~20; the term cost ~8% of the 16B fc_in GEMV at 1 thread, this
// form 3-4% less in all.
static inline float q8_zero_term(const uint16_t* s, const uint16_t* z, const float* xz, i64 G, float c) {
    using namespace jmoss_k;
    const vec cv = vbroadcast1(c);
    vec acc = vzero();
    i64 g = 0;
    for (; g + VW <= G; g += VW) acc = vfma(vmul(vload(s + g), vsub(vload(z + g), cv)), vload(xz + g), acc);
    float t = vsum(acc);
    for (; g < G; g++) t += scalar_load(s + g) * (scalar_load(z + g) - c) * xz[g];
    return t;
}

static inline float q8_dot_g(const float* a, const float* b, i64 G) {
    __m256 acc = _mm256_setzero_ps();
    i64 g = 0;
    for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + g), _mm256_loadu_ps(b + g), acc);
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    float t = _mm_cvtss_f32(v);
    for (; g < G; g++) t += a[g] * b[g];
    return t;
}

// Whether MT x rows go through the 4-row tiles: int4 always; int8 on VNNI from 4 x rows (they take
// its codes as u8, c = 0). Below that the AVX2 int8 tile stays: measured on the 16B fc_in shape,
// 1 thread, Xeon (AVX-512 VNNI), M = 1/2/3/4/5/8: AVX2 tile 12-18/20/17-21/23-31/32/48 ms, VNNI
// 4-row tile 17-22/22/21-22/18-24/26/27 ms.
template <int BITS, int MT>
static inline constexpr bool q8_t4() {
    return BITS == 4 || (JMOSS_Q8_VNNI && MT >= 4);
}

template <int BITS, int NR, int MT>
static inline void q8_rows(const uint8_t* q, i64 ldq, const uint16_t* s, const uint16_t* z, i64 G, i64 GS, i64 K,
                           i64 NU, i64 nfull, const int8_t* xq, const float* xd, const float* xz, i64 M, i64 m0, i64 n0,
                           float* y, i64 N, float* sz) {
    float res[NR][MT];
    constexpr bool T4 = NR == 4 && q8_t4<BITS, MT>();
#if JMOSS_Q8_VNNI
    if constexpr (NR == 8) {  // int4 decode (q8_nr): res is float[8][1]
        if (GS % 64 != 0)
            q8_tile8x_vnni<true>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
        else
            q8_tile8x_vnni<false>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
    } else
#endif
    if constexpr (T4) {  // NR == 4: res is the tiles' float[4][MT]
#if JMOSS_Q8_VNNI
        if (BITS == 4 && GS % 64 != 0)
            q8_tile4x_vnni<BITS, MT, true>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
        else
            q8_tile4x_vnni<BITS, MT, false>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
#else
        if (GS % 64 != 0)
            q8_tile4x<MT, true>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
        else
            q8_tile4x<MT, false>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
#endif
    } else if (BITS == 4 && GS % 64 != 0)
        q8_tile<BITS, NR, MT, true>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
    else
        q8_tile<BITS, NR, MT, false>(q + n0 * ldq, ldq, s + n0 * G, G, GS, K, NU, nfull, xq, xd, M, m0, res);
    constexpr float c = BITS == 8 && !T4 ? 128.f : 0.f;  // q8_tile's int8 codes are w' = q - 128
    for (int r = 0; r < NR; r++) {
        if (MT == 1) {  // decode: one pass; several x rows share the row's factors instead
            y[m0 * N + n0 + r] = res[r][0] - q8_zero_term(s + (n0 + r) * G, z + (n0 + r) * G, xz + m0 * G, G, c);
            continue;
        }
        q8_zero_factors(s + (n0 + r) * G, z + (n0 + r) * G, G, c, sz);
        for (int i = 0; i < MT; i++) y[(m0 + i) * N + n0 + r] = res[r][i] - q8_dot_g(sz, xz + (m0 + i) * G, G);
    }
}

// weight rows per tile: 4 where few x rows share them (independent FMA chains); the 4-row tiles
// (q8_t4) always, up to Q8_MT4 x rows (they fold the 4 rows into one or two accumulators per x row)
template <int BITS, int MT>
static inline constexpr int q8_nr() {
    if (JMOSS_Q8_VNNI && BITS == 4 && MT == 1) return 8;  // q8_tile8x_vnni
    return (q8_t4<BITS, MT>() && MT <= Q8_MT4) || MT == 1 ? 4 : MT <= 3 ? 2 : 1;
}

// x rows of one pass over a weight row set: one weight vector is unpacked once for all of them,
// as many as the 16 ymm registers hold (2 accumulators per (weight row, x row)); more weight rows
// per tile where there are few x rows, so the FMA chains of a group stay independent.
template <int BITS, int MT>
static inline void q8_mtile(const uint8_t* q, i64 ldq, const uint16_t* s, const uint16_t* z, i64 G, i64 GS, i64 K,
                            i64 NU, i64 nfull, const int8_t* xq, const float* xd, const float* xz, i64 M, i64 m0,
                            i64 n0, int nr, float* y, i64 N, float* sz) {
    constexpr int NR = q8_nr<BITS, MT>();
    if (nr >= NR) {
        q8_rows<BITS, NR, MT>(q, ldq, s, z, G, GS, K, NU, nfull, xq, xd, xz, M, m0, n0, y, N, sz);
    } else {
        int r = 0;
        if (NR == 8 && nr >= 4) {  // the 8-row tile's 4-row form: the same results for each row
            q8_rows<BITS, 4, MT>(q, ldq, s, z, G, GS, K, NU, nfull, xq, xd, xz, M, m0, n0, y, N, sz);
            r = 4;
        }
        for (; r < nr; r++)
            q8_rows<BITS, 1, MT>(q, ldq, s, z, G, GS, K, NU, nfull, xq, xd, xz, M, m0, n0 + r, y, N, sz);
    }
}

// nr (<= 8) weight rows from n0 in tiles of q8_nr
template <int BITS, int MT>
static inline void q8_span(const uint8_t* q, i64 ldq, const uint16_t* s, const uint16_t* z, i64 G, i64 GS, i64 K,
                           i64 NU, i64 nfull, const int8_t* xq, const float* xd, const float* xz, i64 M, i64 m0,
                           i64 n0, int nr, float* y, i64 N, float* sz) {
    constexpr int NR = q8_nr<BITS, MT>();
    for (int r = 0; r < nr; r += NR)
        q8_mtile<BITS, MT>(q, ldq, s, z, G, GS, K, NU, nfull, xq, xd, xz, M, m0, n0 + r, std::min(NR, nr - r), y, N, sz);
}

template <int BITS, class BT>
static void qlinear_q8(const float* x, const int32_t* perm, const uint8_t* q, const uint16_t* s, const uint16_t* z,
                       const BT* bias, float* y, i64 M, i64 K, i64 N, i64 ldq, i64 GS, int threads, int act) {
    constexpr i64 UC = BITS == 4 ? 64 : 32;
    const i64 G = (K + GS - 1) / GS, NU = (K + UC - 1) / UC, nfull = K / UC;
    static thread_local std::vector<float> xp_v, xd_v, xz_v;
    static thread_local std::vector<int8_t> xq_v;
    float* xp = jmoss_k::aligned64(xp_v, M * K);
    for (i64 m = 0; m < M; m++)
        for (i64 j = 0; j < K; j++) xp[m * K + j] = x[m * K + (perm ? perm[j] : j)];
    int8_t* xq = jmoss_k::aligned64(xq_v, NU * M * UC);
    float* xd = jmoss_k::aligned64(xd_v, NU * M * 8);
    float* xz = jmoss_k::aligned64(xz_v, M * G);
    q8_quantize<BITS>(xp, M, K, GS, G, NU, xq, xd, xz);
    // x row tiles: up to 6 (int8 on AVX2) / 8 (the 4-row tiles) rows share a weight vector; more go as tiles
    i64 tiles[16][2];
    int ntiles = 0;
    for (i64 m0 = 0; m0 < M;) {
        // 4 weight rows per tile (q8_tile4x*): up to Q8_MT4 x rows a tile, up to twice that split in two
        const i64 rem = M - m0,
                  mt = q8_t4<BITS, Q8_MT4>() ? (rem <= Q8_MT4 ? rem : rem <= 2 * Q8_MT4 ? (rem + 1) / 2 : Q8_MT4)
                                             : rem <= 6 ? rem : 4;
        tiles[ntiles][0] = m0;
        tiles[ntiles++][1] = mt;
        m0 += mt;
    }
    threads = jmoss_pool::threads_for_bytes(threads, N * ldq * M);
    const i64 CHUNK = qgemv_chunk(N, threads), nchunks = (N + CHUNK - 1) / CHUNK;
    jmoss_pool::parallel_for(threads, nchunks, [&](i64 c) {
        static thread_local std::vector<float> sz_v;
        float* sz = jmoss_k::aligned64(sz_v, G + 8);
        const i64 n_begin = c * CHUNK, n_end = std::min(N, n_begin + CHUNK);
        for (i64 n0 = n_begin; n0 < n_end; n0 += 8) {
            const int nr = (int)std::min<i64>(8, n_end - n0);
            for (int t = 0; t < ntiles; t++) {
                const i64 m0 = tiles[t][0];
#define JMOSS_Q8_ARGS q, ldq, s, z, G, GS, K, NU, nfull, xq, xd, xz, M, m0
                switch (tiles[t][1]) {
                    case 1: q8_span<BITS, 1>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                    case 2: q8_span<BITS, 2>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                    case 3: q8_span<BITS, 3>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                    case 4: q8_span<BITS, 4>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                    case 5: q8_span<BITS, 5>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                    case 6: q8_span<BITS, 6>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                    case 7: q8_span<BITS, 7>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                    default: q8_span<BITS, 8>(JMOSS_Q8_ARGS, n0, nr, y, N, sz); break;
                }
#undef JMOSS_Q8_ARGS
            }
        }
        jmoss_k::bias_act_columns(y, M, N, n_begin, n_end, bias, act);
    });
}
#else
#define JMOSS_Q8 0
#endif
}  // namespace jmoss_q
