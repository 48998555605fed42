// The thread pool every parallel loop of the kernels runs on (jmoss_pool::parallel_for).
//
// Why not OpenMP: a team of OpenMP threads ends each parallel region at a barrier that waits for
// every member, including one the OS has descheduled (a compiler or a browser on the same core),
// and its members spin while they wait, against the very thread that must run. On a 2-vCPU VM
// with one core kept busy by another process, 2 threads decoded a MOSS-16B-shaped int4 store at
// 0.26 tok/s, 4.3x slower than 1 thread. Here:
//
// - Work is split into chunks (32 weight rows of a GEMV, one GEMM panel, one attention head ...)
//   claimed one at a time from a shared counter, and the calling thread claims chunks too. A job
//   is over when every chunk is done, not when every thread has checked in: a worker that has not
//   woken up yet claims nothing and delays nothing, and one descheduled in the middle of a chunk
//   delays only that chunk.
// - Waiting yields the core after a short spin: idle workers spin ~IDLE_SPIN_NS for the next job
//   (a decode step runs a few jobs per layer, microseconds apart) and then sleep on a futex; the
//   caller waiting for the last chunks of others spins ~WAIT_SPIN_NS and then sleeps, so the core
//   goes to whoever is runnable, possibly the very worker it waits for.
// - Which thread computes a chunk never changes what the chunk computes, so results are
//   bit-identical for any thread count and schedule (tests compare dynamic, static and a
//   deliberately slow worker, at 1, 2 and 3 threads).
//
// One pool per process: the state lives in a static of an inline function, which GCC emits as a
// STB_GNU_UNIQUE object, so every jt.code kernel library (each its own dlopen'ed .so, each with
// this text compiled in) binds to the same one. Workers are started on first use, as many as the
// largest thread count asked for less one, and live as long as the process; a thread that calls
// in while another call is running (or from inside a chunk) runs its loop by itself.
namespace jmoss_pool {
typedef int64_t i64;
typedef void (*chunk_fn)(const void* ctx, i64 chunk);

enum schedule { DYNAMIC = 0, STATIC = 1, SLOW_WORKER = 2 };  // STATIC, SLOW_WORKER: tests only
static const int MAX_THREADS = 256;
static const i64 IDLE_SPIN_NS = 100000;  // a worker's spin for the next job before it sleeps
static const i64 WAIT_SPIN_NS = 30000;   // the caller's spin for others' last chunks before it sleeps
static const uint32_t NO_CHUNK = 0xFFFFFFFFu;
// A decode GEMV reading less than this per thread is not split further: a small model's 64x64
// layer (8 KiB) costs less than waking a second thread for it.
static const i64 MIN_BYTES_PER_THREAD = 128 << 10;

// The threads worth using for a job that streams `bytes` (at least 1, at most `threads`).
inline int threads_for_bytes(int threads, i64 bytes) {
    return (int)std::max<i64>(1, std::min<i64>(threads, bytes / MIN_BYTES_PER_THREAD));
}

static inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline i64 now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

static inline void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
#else
    (void)word;
    (void)expected;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
}

static inline void futex_wake(std::atomic<uint32_t>* word, int count) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
#else
    (void)word;
    (void)count;
#endif
}

struct state_t {
    // The job: the caller writes fn..mode, then claim = (job << 32) | 0, then epoch = job. A chunk is
    // claimed by a CAS that checks the job number, so a worker still holding an older job's fields
    // can never take a chunk of a newer one (the caller sets claim to the new number before it
    // touches the fields).
    alignas(64) std::atomic<uint64_t> claim{0};
    alignas(64) std::atomic<uint32_t> done{0};  // chunks finished; the caller's futex word
    std::atomic<uint32_t> caller_sleeping{0};
    alignas(64) std::atomic<uint32_t> epoch{0};  // the current job's number; the workers' futex word
    std::atomic<uint32_t> sleepers{0};
    alignas(64) std::atomic<chunk_fn> fn{nullptr};
    std::atomic<const void*> ctx{nullptr};
    std::atomic<uint32_t> nchunks{0};
    std::atomic<int> helpers{0};  // workers that may take part (threads - 1)
    std::atomic<int> mode{DYNAMIC};
    std::atomic<int> busy{0};     // a caller is inside run()
    std::atomic<int> workers{0};  // worker threads started
    std::mutex grow;
};

inline state_t& state() {
    static state_t s;
    return s;
}

// The schedule of jobs started by this thread (tests); cpu.py sets it per op with a scope.
inline int& thread_mode() {
    static thread_local int mode = DYNAMIC;
    return mode;
}

struct scope {
    int saved;
    explicit scope(int mode) : saved(thread_mode()) { thread_mode() = mode; }
    ~scope() { thread_mode() = saved; }
};

static inline void finish_chunk(state_t& p, uint32_t n) {
    if (p.done.fetch_add(1, std::memory_order_seq_cst) + 1 == n && p.caller_sleeping.load(std::memory_order_seq_cst))
        futex_wake(&p.done, 1);
}

// Claim and run chunks of job `job` until none is left (or the job is no longer current).
static inline void work_dynamic(state_t& p, uint32_t job, uint32_t n, chunk_fn fn, const void* ctx) {
    for (;;) {
        uint64_t v = p.claim.load(std::memory_order_acquire);
        for (;;) {
            if ((uint32_t)(v >> 32) != job || (uint32_t)v >= n) return;
            if (p.claim.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) break;
        }
        fn(ctx, (i64)(uint32_t)v);
        finish_chunk(p, n);
    }
}

// Participant `part` of `parts` runs its contiguous share, as OpenMP's schedule(static) would.
static inline void work_static(state_t& p, int part, int parts, uint32_t n, chunk_fn fn, const void* ctx) {
    const i64 b = (i64)n * part / parts, e = (i64)n * (part + 1) / parts;
    for (i64 c = b; c < e; c++) {
        fn(ctx, c);
        finish_chunk(p, n);
    }
}

static inline uint32_t wait_for_job(state_t& p, uint32_t seen) {
    i64 start = 0;
    for (int i = 1;; i++) {
        const uint32_t e = p.epoch.load(std::memory_order_acquire);
        if (e != seen) return e;
        if (i & 63) {
            relax();
            continue;
        }
        const i64 t = now_ns();
        if (!start) start = t;
        if (t - start < IDLE_SPIN_NS) continue;
        p.sleepers.fetch_add(1, std::memory_order_seq_cst);
        if (p.epoch.load(std::memory_order_seq_cst) == seen) futex_wait(&p.epoch, seen);
        p.sleepers.fetch_sub(1, std::memory_order_seq_cst);
        start = 0;
    }
}

inline void worker_main(int index, uint32_t seen) {
    state_t& p = state();
    for (;;) {
        const uint32_t job = wait_for_job(p, seen);
        seen = job;
        const chunk_fn fn = p.fn.load(std::memory_order_relaxed);
        const void* ctx = p.ctx.load(std::memory_order_relaxed);
        const uint32_t n = p.nchunks.load(std::memory_order_relaxed);
        const int helpers = p.helpers.load(std::memory_order_relaxed);
        const int mode = p.mode.load(std::memory_order_relaxed);
        // Fields read above that belong to a newer job imply that claim already carries its number.
        std::atomic_thread_fence(std::memory_order_acquire);
        if (index >= helpers) continue;
        if (mode == SLOW_WORKER) std::this_thread::sleep_for(std::chrono::microseconds(300));
        if (mode == STATIC) {
            // Past this check the job cannot end without this share, so its fields stay valid.
            if ((uint32_t)(p.claim.load(std::memory_order_acquire) >> 32) == job)
                work_static(p, index + 1, helpers + 1, n, fn, ctx);
        } else {
            work_dynamic(p, job, n, fn, ctx);
        }
    }
}

// A child forked from this process has none of its threads: it starts its own when it needs them.
inline void forget_workers_after_fork() {
    state_t& p = state();
    p.workers.store(0);
    p.sleepers.store(0);
    p.busy.store(0);
    new (&p.grow) std::mutex();  // a lock held by a thread that does not exist in the child
}

// Start workers until there are `want` (or thread creation fails); returns how many there are.
inline int ensure_workers(state_t& p, int want) {
    int have = p.workers.load(std::memory_order_acquire);
    if (have >= want) return have;
    std::lock_guard<std::mutex> lock(p.grow);
#if defined(__linux__)
    static bool fork_handler = pthread_atfork(nullptr, nullptr, forget_workers_after_fork) == 0;
    (void)fork_handler;
#endif
    have = p.workers.load(std::memory_order_relaxed);
    const uint32_t seen = p.epoch.load(std::memory_order_relaxed);  // the next job is theirs too
    while (have < want) {
        try {
            std::thread(worker_main, have, seen).detach();
        } catch (...) {
            break;
        }
        p.workers.store(++have, std::memory_order_release);
    }
    return have;
}

// fn(ctx, c) for every c in [0, n) on up to `threads` threads (the caller is one of them).
inline void run(int threads, i64 n, chunk_fn fn, const void* ctx) {
    if (n <= 0) return;
    state_t& p = state();
    int expected = 0;
    if (threads <= 1 || n == 1 || n >= (i64)NO_CHUNK ||
        !p.busy.compare_exchange_strong(expected, 1, std::memory_order_acquire)) {
        for (i64 c = 0; c < n; c++) fn(ctx, c);
        return;
    }
    const int mode = thread_mode();
    int helpers = (int)std::min<i64>(std::min(threads, MAX_THREADS) - 1, n - 1);
    helpers = std::min(helpers, ensure_workers(p, helpers));
    const uint32_t job = p.epoch.load(std::memory_order_relaxed) + 1;
    p.claim.store(((uint64_t)job << 32) | NO_CHUNK, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    p.fn.store(fn, std::memory_order_relaxed);
    p.ctx.store(ctx, std::memory_order_relaxed);
    p.nchunks.store((uint32_t)n, std::memory_order_relaxed);
    p.helpers.store(helpers, std::memory_order_relaxed);
    p.mode.store(mode, std::memory_order_relaxed);
    p.done.store(0, std::memory_order_relaxed);
    p.claim.store((uint64_t)job << 32, std::memory_order_release);
    p.epoch.store(job, std::memory_order_seq_cst);
    if (p.sleepers.load(std::memory_order_seq_cst) > 0) futex_wake(&p.epoch, INT_MAX);

    if (mode == STATIC)
        work_static(p, 0, helpers + 1, (uint32_t)n, fn, ctx);
    else
        work_dynamic(p, job, (uint32_t)n, fn, ctx);

    const uint32_t all = (uint32_t)n;
    const i64 start = now_ns();
    for (int i = 1; p.done.load(std::memory_order_acquire) != all; i++) {
        if ((i & 63) || now_ns() - start < WAIT_SPIN_NS) {
            relax();
            continue;
        }
        p.caller_sleeping.store(1, std::memory_order_seq_cst);
        const uint32_t d = p.done.load(std::memory_order_seq_cst);
        if (d != all) futex_wait(&p.done, d);
        p.caller_sleeping.store(0, std::memory_order_relaxed);
    }
    p.busy.store(0, std::memory_order_release);
}

// One chunk of a parallel_for. noipa: exactly one compiled body per loop, whichever thread runs
// it and whether or not the job is split. Otherwise GCC inlines the body into run()'s one-thread
// loop as well, optimises that copy differently (-Ofast lets it reorder a reduction), and a
// LayerNorm row came out 1 ulp apart between 1 and 2 threads.
template <class F>
__attribute__((noipa)) void run_chunk(const void* ctx, i64 c) {
    (*static_cast<const F*>(ctx))(c);
}

// f(c) for every chunk c in [0, n): the form the kernels use (f a lambda; it must not throw).
template <class F>
inline void parallel_for(int threads, i64 n, const F& f) {
    run(threads, n, &run_chunk<F>, &f);
}

// How many threads really take part in a job of `threads` chunks: each chunk waits (up to a
// second) until every chunk has been claimed, so no thread can take two while others exist; the
// answer is how many had arrived when chunk 0 stopped waiting. For tests and info().
inline int threads_used(int threads) {
    if (threads <= 1) return 1;
    std::atomic<int> arrived{0}, first{0};
    const i64 deadline = now_ns() + 1000000000;
    parallel_for(threads, threads, [&](i64 c) {
        arrived.fetch_add(1);
        while (arrived.load() < threads && now_ns() < deadline) std::this_thread::yield();
        if (c == 0) first.store(arrived.load());
    });
    return first.load();
}
}  // namespace jmoss_pool
