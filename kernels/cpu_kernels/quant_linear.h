// The entry dispatchers for a linear layer: flinear (fp16 / fp32 weights) and qlinear (packed),
// each choosing the int8 compute mode (VNNI prefill, AVX2 decode), the prefill GEMM or the decode GEMV.
namespace jmoss_q {
using jmoss_k::i64;

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
#if JMOSS_Q8
    if (i8 && M < jmoss_k::QUANT_GEMM_MIN_M && q8_applies<BITS>(GS)) {
        qlinear_q8<BITS>(x, perm, q, s, z, bias, y, M, K, N, ldq, GS, threads, act);
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
    const i64 MB = std::max<i64>(4, std::min<i64>(M, (512 * 1024 / 4) / std::max<i64>(K, 1) / 4 * 4));
    threads = jmoss_pool::threads_for_bytes(threads, N * ldq * M);
    const i64 CHUNK = qgemv_chunk(N, threads), nchunks = (N + CHUNK - 1) / CHUNK;
    jmoss_pool::parallel_for(threads, nchunks, [&](i64 c) {
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
            static thread_local std::vector<float> wbuf;
            float* w = jmoss_k::aligned64(wbuf, 4 * K);
            dequant_panel<BITS>{q, s, z, K, ldq, GS, G}(n0, nr, w);
            // y + n0 as the output base: the tile writes column n0 + jj of row m.
            for (i64 mb = 0; mb < M; mb += MB) {
                const i64 me = std::min(M, mb + MB);
                i64 m0 = mb;
                for (; m0 + 4 <= me; m0 += 4) jmoss_k::tile_nr<4>(xp, (const float*)w, y + n0, m0, 0, nr, K, N);
                if (m0 < me) jmoss_k::tile_any(xp, (const float*)w, y + n0, m0, (int)(me - m0), 0, nr, K, N);
            }
        }
        jmoss_k::bias_act_columns(y, M, N, n_begin, n_end, bias, act);
    });
}
}  // namespace jmoss_q
