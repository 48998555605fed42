// fp16 / fp32 weight GEMV and small-M dot-product tiles (decode, 2-31 rows).
namespace jmoss_k {

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
}  // namespace jmoss_k
