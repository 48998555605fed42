// ------------------------------------------------------------------------------------------
// A whole decoder layer for a few rows (decode: M = B*T <= FUSED_MAX_ROWS) in one op.
//
// The same kernels the per-op path calls, in the same order and precision (LayerNorm, qkv,
// rotary_split, the cache write, attention, out_proj, fc_in + gelu_new, fc_out, then
// (attn + mlp) + h), so the two paths agree to the last bit the compiler allows. What it
// saves is the ~12 jittor ops a layer costs otherwise (graph building and dispatch, ~20 us
// each): a 350M-shape decode step on 2 cores, same process, interleaved, went from 21.7 to
// 14.5 ms (int4), 29.6 to 24.3 (int8), 32.6 to 29.0 (fp16). keys/values are
// the layer's static cache [B, H, L, Dh], written in place at [start, start + T) like the
// per-op path's setitem. Scratch rows live in per-thread vectors sized for M rows (tiny).
namespace jmoss_f {
using jmoss_k::i64;

template <int BITS, class PT>
struct lin {  // BITS 0: fp16 weight [N, K] in w; 4 / 8: packed parts (qweight in w) of store format 2
    const void* w;
    const int32_t* perm;
    const uint16_t* s;
    const uint16_t* z;
    const PT* bias;
    i64 K, N, ldq, GS;
    void operator()(const float* x, float* y, i64 M, int act, int threads, int amx, int i8) const {
        if (BITS == 0)
            jmoss_q::flinear(x, (const uint16_t*)w, bias, y, M, K, N, threads, act, amx, i8);
        else
            jmoss_q::qlinear<BITS == 0 ? 8 : BITS>(x, perm, (const uint8_t*)w, s, z, bias, y, M, K, N, ldq, GS, threads,
                                                   act, i8);
    }
};

template <int BITS, class PT>
static void decode_block(const float* h, float* hout, const PT* ln_w, const PT* ln_b, float eps,
                         const lin<BITS, PT>& qkv, const lin<BITS, PT>& out_proj, const lin<BITS, PT>& fc_in,
                         const lin<BITS, PT>& fc_out, const float* sn, const float* cs, const float* mask,
                         float* keys, float* values, i64 B, i64 T, i64 H, i64 Dh, i64 L, i64 start, i64 R,
                         int threads, int amx, int i8) {
    const i64 M = B * T, D = H * Dh, S = start + T, F = fc_in.N;
    static thread_local std::vector<float> buf;
    float* a = jmoss_k::aligned64(buf, M * (D + 3 * D + D + 2 * D + D + D + F + D));
    float* qkvb = a + M * D;
    float* q = qkvb + 3 * M * D;
    float* kv = q + M * D;  // k [B, H, T, Dh] then v
    float* ctx = kv + 2 * M * D;
    float* attn = ctx + M * D;
    float* f = attn + M * D;
    float* mlp = f + M * F;
    jmoss_k::layer_norm(h, ln_w, ln_b, a, M, D, eps, threads);
    qkv(a, qkvb, M, 0, threads, amx, i8);
    jmoss_k::rotary_split(qkvb, sn, cs, q, kv, kv + M * D, B, T, H, Dh, R);
    for (i64 bh = 0; bh < B * H; bh++)
        for (i64 t = 0; t < T; t++) {
            std::memcpy(keys + (bh * L + start + t) * Dh, kv + (bh * T + t) * Dh, Dh * sizeof(float));
            std::memcpy(values + (bh * L + start + t) * Dh, kv + M * D + (bh * T + t) * Dh, Dh * sizeof(float));
        }
    jmoss_k::attention(q, keys, values, mask, ctx, B, T, H, Dh, L, S, threads);
    out_proj(ctx, attn, M, 0, threads, amx, i8);
    fc_in(a, f, M, 1, threads, amx, i8);
    fc_out(f, mlp, M, 0, threads, amx, i8);
    for (i64 i = 0; i < M * D; i++) hout[i] = (attn[i] + mlp[i]) + h[i];
}
}  // namespace jmoss_f
