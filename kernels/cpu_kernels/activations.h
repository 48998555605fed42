// gelu_new (scalar and 16-lane AVX-512) and the bounded exp the softmax shares with it.
namespace jmoss_k {

static inline float gelu_new(float v) {
    // 0.5*v*(1+tanh(u)) == v * sigmoid(2u) == v / (1 + exp(-2u)); one expf, vectorisable.
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    float u = c * (v + 0.044715f * v * v * v);
    // -Ofast assumes no infinities, so keep expf finite; tanh(20) == 1 in fp32 anyway.
    u = std::min(20.0f, std::max(-20.0f, u));
    return v / (1.0f + expf(-2.0f * u));
}

#if JMOSS_ISA == 2
// gelu_new on 16 lanes with the same formula and clamp. glibc's expf is not vectorised at -O2
// (libmvec needs -ffast-math), and the scalar call cost ~8 ns per element: 20% of a CodeGen-350M
// prefill. exp(t) = 2^n * e^r, n = round(t / ln 2), |r| <= ln2 / 2, e^r by its degree-7 Taylor
// polynomial (truncation < 6e-9 relative), 2^n applied exactly by scalef. Used for |t| <= 87
// (gelu: |t| <= 40; softmax numerators: [-87, 0]), where n stays within fp32's exponent range.
static inline __m512 vexp_bounded(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.4426950408889634f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);  // ln 2 = hi + lo (Cody-Waite)
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 gelu_new16(__m512 v) {
    const __m512 c = _mm512_set1_ps(0.7978845608028654f);
    __m512 u = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
    u = _mm512_min_ps(_mm512_set1_ps(20.0f), _mm512_max_ps(_mm512_set1_ps(-20.0f), u));
    const __m512 e = vexp_bounded(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#endif

// gelu_new over n contiguous floats in place.
static inline void gelu_row(float* row, i64 n) {
    i64 i = 0;
#if JMOSS_ISA == 2
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(row + i, gelu_new16(_mm512_loadu_ps(row + i)));
    if (i < n) {
        const __mmask16 keep = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(row + i, keep, gelu_new16(_mm512_maskz_loadu_ps(keep, row + i)));
        return;
    }
#endif
    for (; i < n; i++) row[i] = gelu_new(row[i]);
}

// The epilogue every linear layer runs on the output columns [n_begin, n_end) one pool chunk has
// just written, in all M rows of y (M x N): + bias, then gelu_new when act == 1.
template <class BT>
static inline void bias_act_columns(float* y, i64 M, i64 N, i64 n_begin, i64 n_end, const BT* bias, int act) {
    if (!bias && !act) return;
    for (i64 m = 0; m < M; m++) {
        float* row = y + m * N;
        if (bias) {
#pragma omp simd
            for (i64 n = n_begin; n < n_end; n++) row[n] += scalar_load(bias + n);
        }
        if (act == 1) gelu_row(row + n_begin, n_end - n_begin);
    }
}

}  // namespace jmoss_k
