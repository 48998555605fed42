// The fp16 / fp32 weight linear layer: picks AMX, the blocked GEMM or the GEMV tiles by M.
namespace jmoss_k {

// Output columns (rows of W) are handed out in chunks of CHUNK rows from the pool's shared counter:
// each chunk is a long sequential run of weights, and on a shared machine a thread that loses its
// core holds back only the chunk it is on, not the whole op as a static split would.
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
    // M-blocking keeps the slab of x that sweeps past each W tile inside L2 (~512 KiB of x).
    const i64 MB = std::max<i64>(4, std::min<i64>(M, (512 * 1024 / 4) / std::max<i64>(K, 1) / 4 * 4));
    threads = jmoss_pool::threads_for_bytes(threads, N * K * (i64)sizeof(WT) * M);
    jmoss_pool::parallel_for(threads, nchunks, [&](i64 c) {
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
        bias_act_columns(y, M, N, n_begin, n_end, bias, act);
    });
}

}  // namespace jmoss_k
