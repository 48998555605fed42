// Softmax attention over the static KV cache (scores, softmax, values), one job per (batch, head, query).
namespace jmoss_k {

#if JMOSS_ISA == 2
// Lane r of the result = the sum of a[r]'s 16 lanes: a transpose-and-add tree (3 levels of
// in-lane unpack/shuffle, 2 of 128-bit lane shuffles) instead of 16 horizontal reductions.
static inline __m512 sum16x16(const __m512 a[16]) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 f01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 f23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// q . k_r for the 16 consecutive cache rows k_0..k_15 (row stride Dh), any Dh.
static inline __m512 dot16(const float* q, const float* k, i64 Dh) {
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    i64 e = 0;
    for (; e + 16 <= Dh; e += 16) {
        const __m512 qv = _mm512_loadu_ps(q + e);
        for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + r * Dh + e), acc[r]);
    }
    if (e < Dh) {
        const __mmask16 m = (__mmask16)((1u << (Dh - e)) - 1);
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + e);
        for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + r * Dh + e), acc[r]);
    }
    return sum16x16(acc);
}
#endif

// One query row's scores sc[j] = q . k_j / sqrt(Dh) + bias[j] over j < S. Where the bias is the
// mask value (float32's minimum) the dot product cannot change the sum (it is far below half an
// ulp of 3.4e38), so masked blocks of 16 -- half of a causal prefill -- skip it.
static inline void attention_scores(const float* qr, const float* kb, const float* br, float* sc, i64 S, i64 Dh,
                                    float inv_root) {
    i64 j = 0;
#if JMOSS_ISA == 2
    const __m512 masked = _mm512_set1_ps(-1.0e30f), scale = _mm512_set1_ps(inv_root);
    for (; j + 16 <= S; j += 16) {
        const __m512 bv = _mm512_loadu_ps(br + j);
        if (_mm512_cmp_ps_mask(bv, masked, _CMP_LE_OQ) == 0xFFFF) {
            _mm512_storeu_ps(sc + j, bv);
            continue;
        }
        _mm512_storeu_ps(sc + j, _mm512_fmadd_ps(dot16(qr, kb + j * Dh, Dh), scale, bv));
    }
#endif
    for (; j < S; j++) {
        const float* kr = kb + j * Dh;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (i64 e = 0; e < Dh; e++) d += qr[e] * kr[e];
        sc[j] = d * inv_root + br[j];
    }
}

// sc[j] = exp(sc[j] - max) (0 where that is below -87: masked scores, exactly as the reference
// gives them), returning the sum.
static inline float softmax_numerators(float* sc, i64 S) {
    i64 j = 0;
    float mx = -3.0e38f;
#if JMOSS_ISA == 2
    __m512 mv = _mm512_set1_ps(-3.0e38f);
    for (; j + 16 <= S; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sc + j));
    mx = _mm512_reduce_max_ps(mv);
#endif
    for (; j < S; j++) mx = std::max(mx, sc[j]);
    float total = 0.f;
    j = 0;
#if JMOSS_ISA == 2
    const __m512 mxv = _mm512_set1_ps(mx), floor = _mm512_set1_ps(-87.0f);
    __m512 tv = _mm512_setzero_ps();
    for (; j < S; j += 16) {
        const __mmask16 m = S - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - j)) - 1);
        const __m512 z = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j), mxv);
        const __mmask16 live = _mm512_mask_cmp_ps_mask(m, z, floor, _CMP_GE_OQ);
        const __m512 ez = _mm512_maskz_mov_ps(live, vexp_bounded(_mm512_max_ps(z, floor)));
        _mm512_mask_storeu_ps(sc + j, m, ez);
        tv = _mm512_add_ps(tv, ez);
    }
    total = _mm512_reduce_add_ps(tv);
#else
    for (; j < S; j++) {
        // -Ofast assumes no infinities, so expf never sees the masked scores (~3.4e38 below).
        const float z = sc[j] - mx;
        sc[j] = z < -87.0f ? 0.0f : expf(z);
        total += sc[j];
    }
#endif
    return total;
}

// o = inv * sum_j sc[j] v_j over j < S, skipping masked keys (sc[j] == 0 contributes nothing).
static inline void attention_values(const float* sc, float inv, const float* vb, float* o, i64 S, i64 Dh) {
#if JMOSS_ISA == 2
    // 64 output columns at a time in four registers, any Dh (masked lanes past it load nothing).
    for (i64 e0 = 0; e0 < Dh; e0 += 64) {
        __mmask16 m[4];
        for (int v = 0; v < 4; v++) {
            const i64 lanes = std::min<i64>(16, std::max<i64>(0, Dh - e0 - 16 * v));
            m[v] = (__mmask16)((1u << lanes) - 1);
        }
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (i64 j = 0; j < S; j++) {
            if (sc[j] == 0.0f) continue;
            const __m512 p = _mm512_set1_ps(sc[j] * inv);
            const float* vr = vb + j * Dh + e0;
            for (int v = 0; v < 4; v++) acc[v] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m[v], vr + 16 * v), acc[v]);
        }
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(o + e0 + 16 * v, m[v], acc[v]);
    }
#else
    for (i64 e = 0; e < Dh; e++) o[e] = 0.f;
    for (i64 j = 0; j < S; j++) {
        if (sc[j] == 0.0f) continue;
        const float p = sc[j] * inv;
        const float* vr = vb + j * Dh;
#pragma omp simd
        for (i64 e = 0; e < Dh; e++) o[e] += p * vr[e];
    }
#endif
}

// softmax(q . K^T / sqrt(Dh) + bias) . V for every (batch, head, query), reading the static cache
// [B, H, L, Dh] in place over its first S = start + T slots (no [B, H, S, Dh] slice is copied).
// bias [B, T, S] is the additive causal/padding mask (0 or float32's minimum). Output rows are
// head-merged [B*T, H*Dh], i.e. what out_proj reads. Scores use a per-thread scratch of S floats.
static void attention(const float* q, const float* keys, const float* values, const float* bias, float* ctx,
                      i64 B, i64 T, i64 H, i64 Dh, i64 L, i64 S, int threads) {
    const i64 Dm = H * Dh;
    const float inv_root = 1.0f / std::sqrt((float)Dh);
    const i64 jobs = B * H * T;
    jmoss_pool::parallel_for(jobs * S * Dh >= 65536 ? threads : 1, jobs, [&](i64 job) {
        static thread_local std::vector<float> scratch;
        float* sc = aligned64(scratch, S);
        const i64 bb = job / (H * T), h = (job / T) % H, t = job % T;
        const float* qr = q + (bb * T + t) * Dm + h * Dh;
        const float* kb = keys + (bb * H + h) * L * Dh;
        const float* vb = values + (bb * H + h) * L * Dh;
        attention_scores(qr, kb, bias + (bb * T + t) * S, sc, S, Dh, inv_root);
        const float inv = 1.0f / softmax_numerators(sc, S);
        attention_values(sc, inv, vb, ctx + (bb * T + t) * Dm + h * Dh, S, Dh);
    });
}
}  // namespace jmoss_k
