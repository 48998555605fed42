// Packed weights at prefill: 12-row (AVX2: 6) panels dequantized per thread, then jmoss_k's GEMM.
namespace jmoss_q {
using jmoss_k::i64;

static const i64 QUANT_PANEL_MIN_M = 4;

// rows packed rows of W from n0 dequantized into fp32 [rows][K] (exact: (q - z) * s); every ISA.
template <int BITS>
struct dequant_panel {
    const uint8_t* q;
    const uint16_t* s;
    const uint16_t* z;
    i64 K, ldq, GS, G;
    void operator()(i64 n0, int rows, float* w) const {
        for (int r = 0; r < rows; r++) {
            const uint8_t* row = q + (n0 + r) * ldq;
            for (i64 g = 0; g < G; g++) {
                const float sc = jmoss_k::scalar_load(s + (n0 + r) * G + g);
                const float zp = jmoss_k::scalar_load(z + (n0 + r) * G + g);
                const i64 j1 = std::min(K, (g + 1) * GS);
                i64 j = g * GS;
#if JMOSS_ISA >= 1
                if (GS % VW == 0) {
                    const vec vs = vbroadcast1(sc), vz = vbroadcast1(zp);
                    for (; j + VW <= j1; j += VW) {
#if JMOSS_ISA == 2
                        _mm512_storeu_ps(w + r * K + j, _mm512_mul_ps(_mm512_sub_ps(vload_q<BITS>(row, j), vz), vs));
#else
                        _mm256_storeu_ps(w + r * K + j, _mm256_mul_ps(_mm256_sub_ps(vload_q<BITS>(row, j), vz), vs));
#endif
                    }
                }
#endif
                for (; j < j1; j++) w[r * K + j] = (q_at<BITS>(row, j) - zp) * sc;
            }
        }
    }
};

#if JMOSS_ISA >= 1
// Prefill: the register-blocked GEMM of jmoss_k over panels dequantized per thread, x read through perm.
template <int BITS, class BT>
static void gemm_panels_q(const float* x, const int32_t* perm, const uint8_t* q, const uint16_t* s, const uint16_t* z,
                          const BT* bias, float* y, i64 M, i64 K, i64 N, i64 ldq, i64 GS, int threads, int act) {
    const i64 G = (K + GS - 1) / GS;
    jmoss_k::gemm_panels(x, perm, bias, y, M, K, N, threads, act, dequant_panel<BITS>{q, s, z, K, ldq, GS, G});
}
#endif
}  // namespace jmoss_q
