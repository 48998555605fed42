// jmoss CPU kernels, part 1 of the header kernels/cpu.py hands to jt.code: includes, the ISA
// choice, and the vector type every other file computes with.
//
// The kernels are split one file per op family (kernels/cpu_kernels/README.md lists them);
// kernels/cpu.py concatenates them in a fixed order (HEADER_FILES) into one `cpu_header` string,
// so jittor's kernel cache key follows the content of every file and no include path is needed.
// Only this file has #include lines: jittor splices its JIT #defines in after the last #include
// line of the text, so the conditional include comes first and the list ends with unconditional
// ones, and no later file may add one.
//
// Jittor compiles the text with `-march=native -fopenmp -Ofast` (the kernels use no OpenMP:
// every parallel loop runs on pool.h's threads), so the ISA path is chosen at
// compile time from the predefined macros:
//
//   avx512   __AVX512F__ (16 lanes; the K % 16 tail is scalar on every path)
//   avx2     __AVX2__ && __FMA__ && __F16C__
//   portable anything else, or JMOSS_FORCE_PORTABLE defined (tests check both paths agree)
//   (JMOSS_FORCE_AVX2 picks the avx2 path on an AVX-512 CPU, so tests cover it there too)
//
// Why the shape of the code: batch-1 decode is a stream of GEMVs whose cost is reading W once, so
// the GEMV path must run at memory speed: threads take 32-row chunks of W (long sequential
// runs, software-prefetched), four rows at a time share each load of x, fp16 is widened with
// vcvtph2ps straight into FMAs, and accumulation is fp32. Small M (2-3 rows) uses the same
// dot-product micro-kernel with up to 4x4 register tiles; prefill (M >= GEMM_MIN_M) the
// outer-product GEMM of gemm_panels (fp32 weight panels per thread, x packed transposed).
// Nothing is allocated here: the output buffer is jittor's, everything else is
// registers. Bias and gelu_new are applied in a per-chunk epilogue over contiguous output rows,
// where the compiler vectorises expf.
//
// Identifiers must avoid `out` and the `@` character: jittor's code-op template #defines `out`
// and expands `@` macros around this header.
#if !defined(JMOSS_FORCE_PORTABLE) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <linux/futex.h>  // the thread pool's waits (pool.h)
#include <pthread.h>      // pthread_atfork: a forked child starts its own pool threads
#include <sys/syscall.h>  // futex, and AMX's arch_prctl
#include <unistd.h>
#endif
#include <new>
#include <cstdint>
#include <cstring>
#include <vector>
#include <cmath>
#include <algorithm>
#include <type_traits>
#include <atomic>
#include <chrono>
#include <climits>
#include <limits>
#include <mutex>
#include <thread>
#include "type/fp16_compute.h"  // jittor::float16, the element type jittor hands us for fp16 Vars

#if defined(JMOSS_FORCE_PORTABLE)
#define JMOSS_ISA 0
#elif defined(JMOSS_FORCE_AVX2) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JMOSS_ISA 1  // tests run the AVX2 code on an AVX-512 CPU too (the compiler may still use EVEX encodings)
#elif defined(__AVX512F__)
#define JMOSS_ISA 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JMOSS_ISA 1
#else
#define JMOSS_ISA 0
#endif

// AMX-BF16 prefill path: compiled in where -march=native offers AMX (Sapphire Rapids and later),
// and taken at run time only if Linux grants the tile state (see amx_ready) and the caller asks.
#if JMOSS_ISA == 2 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define JMOSS_AMX 1
#else
#define JMOSS_AMX 0
#endif

namespace jmoss_k {

typedef int64_t i64;

// The first 64-byte aligned address of a scratch vector grown to hold n elements past it.
template <class T>
static inline T* aligned64(std::vector<T>& v, i64 n) {
    const i64 need = n + (i64)(64 / sizeof(T));
    if ((i64)v.size() < need) v.resize(need);
    const uintptr_t a = (reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63);
    return reinterpret_cast<T*>(a);
}

// IEEE half -> float without any instruction-set help (portable path, tails, bias).
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
            man &= 0x3ffu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline float scalar_load(const float* p) { return *p; }
static inline float scalar_load(const uint16_t* p) {
#if JMOSS_ISA >= 1
    return _cvtsh_ss(*p);
#else
    return half_to_float(*p);
#endif
}

// ------------------------------------------------------------------------------------------
// Vector loads: widen one vector of weights (fp16 or fp32) to fp32 lanes.
#if JMOSS_ISA == 2
typedef __m512 vec;
static const int VW = 16;
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif JMOSS_ISA == 1
typedef __m256 vec;
static const int VW = 8;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if JMOSS_ISA >= 1
// Broadcasts, adds and stores on the same vector type (GEMM tiles, packed-weight panels).
static inline vec vbcast(const float* p) {
#if JMOSS_ISA == 2
    return _mm512_set1_ps(*p);
#else
    return _mm256_broadcast_ss(p);
#endif
}
static inline vec vbroadcast1(float v) {
#if JMOSS_ISA == 2
    return _mm512_set1_ps(v);
#else
    return _mm256_set1_ps(v);
#endif
}
static inline vec vadd(vec a, vec b) {
#if JMOSS_ISA == 2
    return _mm512_add_ps(a, b);
#else
    return _mm256_add_ps(a, b);
#endif
}
static inline vec vsub(vec a, vec b) {
#if JMOSS_ISA == 2
    return _mm512_sub_ps(a, b);
#else
    return _mm256_sub_ps(a, b);
#endif
}
static inline vec vmul(vec a, vec b) {
#if JMOSS_ISA == 2
    return _mm512_mul_ps(a, b);
#else
    return _mm256_mul_ps(a, b);
#endif
}
static inline void vstore(float* p, vec v) {
#if JMOSS_ISA == 2
    _mm512_storeu_ps(p, v);
#else
    _mm256_storeu_ps(p, v);
#endif
}
#endif
}  // namespace jmoss_k
