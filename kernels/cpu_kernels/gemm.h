// Prefill GEMM for fp16 / fp32 and (through quant_gemm.h) packed weights: register-blocked outer
// products over fp32 weight panels made per thread, x packed transposed (gemm_panels).
namespace jmoss_k {

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
    const i64 slab_blocks = std::max<i64>(1, GEMM_XT_BYTES / (4 * GEMM_MB * std::max<i64>(K, 1)));
    const i64 slab = slab_blocks * GEMM_MB;
    static thread_local std::vector<float> xt_buf;
    const i64 xt_elems = std::min<i64>(slab, (M + GEMM_MB - 1) / GEMM_MB * GEMM_MB) * K;
    float* xt = aligned64(xt_buf, xt_elems);  // its 64-byte loads stay within one line each
    const i64 KC = 256, kchunks = (K + KC - 1) / KC;
    for (i64 s0 = 0; s0 < M; s0 += slab) {
        const i64 srows = std::min(slab, M - s0), nblocks = (srows + GEMM_MB - 1) / GEMM_MB;
        // x^T first (a job of its own: every panel reads all of it), then one panel per chunk.
        jmoss_pool::parallel_for(threads, nblocks * kchunks, [&](i64 c) {
            const i64 b = c / kchunks, kc = c % kchunks;
            pack_xt_block(x, perm, K, s0 + b * GEMM_MB, std::min<i64>(GEMM_MB, srows - b * GEMM_MB), kc * KC,
                          std::min(K, kc * KC + KC), xt + b * GEMM_MB * K);
        });
        jmoss_pool::parallel_for(threads, npanels, [&](i64 p) {
            static thread_local std::vector<float> panel_buf;
            float* panel = aligned64(panel_buf, GEMM_PR * K);
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
        });
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
}  // namespace jmoss_k
