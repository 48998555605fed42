// LayerNorm and the rotary split of the fused qkv rows (the small ops around a layer's GEMVs).
namespace jmoss_k {

// ------------------------------------------------------------------------------------------
// The rest of a decoder layer, fused so that a decode step is a handful of ops instead of ~60
// small jittor ops (each ~3-20 us of graph building and dispatch; jittor-notes §7). All fp32.

// LayerNorm over rows of D, statistics in two passes exactly as the reference (mean, then the
// mean of squared deviations). Decode is one row of 1024: not worth waking a second thread.
template <class PT>
static void layer_norm(const float* x, const PT* w, const PT* b, float* y, i64 M, i64 D, float eps, int threads) {
    jmoss_pool::parallel_for(M >= 8 ? threads : 1, M, [&](i64 m) {
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
    });
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
}  // namespace jmoss_k
