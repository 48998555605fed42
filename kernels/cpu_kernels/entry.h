// Entry points that cpu_src (kernels/cpu.py) calls besides the ops: element-type adapters and
// probes of what the compiled header and this CPU provide.

static const float jmoss_k_one[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// Entry points called from cpu_src; overloads pick the weight/bias element types jittor hands us.
static inline const uint16_t* jmoss_raw(const jittor::float16* p) { return reinterpret_cast<const uint16_t*>(p); }
static inline const float* jmoss_raw(const float* p) { return p; }

// Memory-bandwidth probe: the pool's threads sum 256 KiB chunks of a buffer, claimed as the GEMV
// claims its 32-row chunks, with the same wide loads. This is the roof the GEMV is judged against
// (same threads, same compiler, same access pattern, no arithmetic to speak of).
static inline float jmoss_read_probe(const float* p, int64_t n, int threads) {
    const int64_t CHUNK = 65536, nchunks = (n + CHUNK - 1) / CHUNK;
    std::vector<float> part(nchunks, 0.f);
    jmoss_pool::parallel_for(threads, nchunks, [&](int64_t c) {
        const int64_t b = c * CHUNK, e = std::min(n, b + CHUNK);
        int64_t i = b;
        float s = 0.f;
#if JMOSS_ISA >= 1
        using namespace jmoss_k;
        vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero(), one = vload(&jmoss_k_one[0]);
        for (; i + 4 * VW <= e; i += 4 * VW) {
            a0 = vfma(vload(p + i), one, a0);
            a1 = vfma(vload(p + i + VW), one, a1);
            a2 = vfma(vload(p + i + 2 * VW), one, a2);
            a3 = vfma(vload(p + i + 3 * VW), one, a3);
        }
        s = vsum(a0) + vsum(a1) + vsum(a2) + vsum(a3);
#endif
        for (; i < e; i++) s += p[i];
        part[c] = s;
    });
    float total = 0.f;
    for (float s : part) total += s;
    return total;
}

// 1 when the AMX-BF16 prefill path is compiled in and Linux grants the tile state here.
static inline int jmoss_amx_ready() {
#if JMOSS_AMX
    return jmoss_k::amx_ready() ? 1 : 0;
#else
    return 0;
#endif
}

// How many pool threads a job asked for `threads` really runs on at once (tests, info()).
static inline int jmoss_threads_used(int threads) { return jmoss_pool::threads_used(threads); }

static inline const uint8_t* jmoss_u8(const uint8_t* p) { return p; }
static inline const uint8_t* jmoss_u8(const int8_t* p) { return reinterpret_cast<const uint8_t*>(p); }

// 1 when the int8 compute mode's packed decode kernels (quant_q8.h, AVX2) are compiled in.
static inline int jmoss_q8_ready() {
#if JMOSS_Q8
    return 1;
#else
    return 0;
#endif
}

// 1 when the int8 compute mode's packed decode runs its 4-row tiles on AVX-512 VNNI (quant_q8.h).
static inline int jmoss_q8_vnni_ready() {
#if JMOSS_Q8 && JMOSS_Q8_VNNI
    return 1;
#else
    return 0;
#endif
}

// 1 when the opt-in int8 (VNNI) prefill compute mode is compiled in (AVX-512 VNNI + BW).
static inline int jmoss_vnni_ready() {
#if JMOSS_VNNI
    return 1;
#else
    return 0;
#endif
}
