// Prefill GEMM on AMX-BF16 tiles ("bf16x3", fp32-class accuracy), compiled in only where
// -march=native offers AMX; taken at run time only where Linux grants the tile state.
namespace jmoss_k {

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
// rebalances between chunks of 8).
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
    // x split and packed first, one 16-row m-block per chunk (every panel reads all of it).
    jmoss_pool::parallel_for(threads, MBn, [&](i64 mb) {
        static thread_local std::vector<uint16_t> scratch;
        uint16_t* rh = aligned64(scratch, 4 * Kp);
        uint16_t* rl = rh + 2 * Kp;
        for (i64 m = mb * 16; m < mb * 16 + 16; m++) {
            const i64 mm = m % 16;
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
        }
    });
    // Then AMX_PANELS panels per chunk: the tile state is configured and released per chunk, so
    // whichever pool thread claims it may run it.
    jmoss_pool::parallel_for(threads, (NBn + AMX_PANELS - 1) / AMX_PANELS, [&](i64 chunk) {
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
        for (i64 nb = chunk * AMX_PANELS; nb < std::min<i64>(NBn, (chunk + 1) * AMX_PANELS); nb++) {
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
    });
}
#endif
}  // namespace jmoss_k
