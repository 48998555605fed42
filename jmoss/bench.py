"""``jmoss bench``: what a user compares, each run measured the same way in its own process.

For every run (jmoss's streaming engine, and with ``--compare jittor`` Jittor's native swap on the
same model, budget, prompt and greedy decode) a fresh child process loads the model, warms up
(JIT compiles), then times a prefill of ``prompt_tokens`` (the median of 3 when nothing streams)
and ``decode_tokens`` greedy decode steps. The parent measures the child's peak RSS from outside
(its ``VmHWM``, read while the child is stopped at its end; see ``spawn_measured``), so nothing the
child forgets to count is missed. Printed side by side:

- prefill and decode tok/s;
- bytes streamed per decode token (the engine's own count; for the jittor run, the bytes its
  swap read back through ``read()`` per token, from /proc/self/io ``rchar``) and the bytes it
  wrote (jittor's swap rewrites evicted weights; jmoss never writes);
- achieved read GB/s during decode next to the measured bound of this machine: on CPU a
  sequential ``preadv`` of the store's layer files into one reused buffer after dropping them
  from the page cache (``posix_fadvise(DONTNEED)``), i.e. what the disk path gives a perfect
  reader; on CUDA the pinned host-to-device copy rate (jmoss.engine.cuda);
- peak RSS against the budget.

With everything resident on the CPU (no budget) nothing is streamed, so the bytes that matter are
the weights the forward reads from memory each token, and the bound is the memory read rate of
this machine (``jmoss.kernels.memory_read_probe``); ``--compare torch`` runs transformers'
CodeGenForCausalLM on the same weights and tokens in its best CPU configuration (every dtype is
measured in its own process, the fastest decode is the row, the others are listed under it).

A comparison is a function ``(options) -> figures dict`` registered in ``COMPARISONS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from jmoss.errors import JmossError
from jmoss.sizes import format_size

Figures = dict[str, Any]


# ------------------------------------------------------------------------------ a busy machine


@contextlib.contextmanager
def busy_competitors(count: int | None = None) -> Iterator[int]:
    """One CPU-bound process (``while True: pass``, pinned nowhere) per CPU this process may run
    on, or ``count``, for the duration of the block: a desktop that is doing something else, as
    the "loaded" rows of ``--competitors`` and benchmarks/bench_threads.py measure."""
    count = count or len(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let the scheduler spread them before anything is timed
        yield count
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


# ------------------------------------------------------------------------------ the bound


def store_read_bound(model: str | Path, repeats: int = 2) -> Figures:
    """GB/s of a cold sequential read of the store's layer and head files (the CPU engine's path).

    Each group's data span is read with one ``preadv`` into a single reused buffer, after its
    pages were dropped from the cache, exactly as the engine reads; the best of ``repeats``.
    """
    from jmoss.layout import EMBED, all_groups
    from jmoss.engine.pipeline import _fadvise_dontneed, read_span
    from jmoss.store import Store, resolve_model

    store = Store.open(resolve_model(str(model)))
    spans = [(store.group_path(g), *store.group_data_span(g)) for g in all_groups(store.config) if g != EMBED]
    buf = np.empty(max(n for _, _, n in spans), dtype=np.uint8)
    best = 0.0
    total = sum(n for _, _, n in spans)
    for _ in range(repeats):
        fds = [os.open(path, os.O_RDONLY) for path, _, _ in spans]
        try:
            for fd, (_, offset, n) in zip(fds, spans):
                _fadvise_dontneed(fd, offset, n)
            t0 = time.perf_counter()
            for fd, (_, offset, n) in zip(fds, spans):
                read_span(fd, memoryview(buf)[:n], offset)
            best = max(best, total / (time.perf_counter() - t0) / 1e9)
        finally:
            for fd in fds:
                os.close(fd)
    return {"what": "cold sequential preadv of the store", "gbps": best, "bytes": total}


# ------------------------------------------------------------------------------ one run (child)


def _proc_io() -> dict[str, int]:
    try:
        lines = Path("/proc/self/io").read_text().split("\n")
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in lines if ": " in line)}


PREFILL_REPEATS = 3


def measure_in_this_process(options: dict[str, Any]) -> Figures:
    """Load, warm up, time prefill and greedy decode; runs inside the child process."""
    import jmoss
    from jmoss import kernels

    from jmoss.engine.ops import uses_kernels

    t0 = time.perf_counter()
    model = jmoss.load(options["model"], device=options["device"], device_memory=options["device_memory"],
                       host_memory=options.get("host_memory"), max_seq_len=options.get("max_seq_len"),
                       swap=options.get("swap"), threads=options.get("threads"),
                       offload=options.get("offload", "auto"))
    load_s = time.perf_counter() - t0
    wait_for_copy = getattr(model.weights, "wait_for_copy", None)
    if wait_for_copy is not None:  # weights being copied into 2 MiB pages: every round measures the copy
        wait_for_copy()
    prompt_n, decode_n = options["prompt_tokens"], options["decode_tokens"]
    vocab = model.config.vocab_size
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, prompt_n)]

    warm = model.session(max_len=prompt_n + decode_n)  # compiles every kernel both phases use
    logits = warm.prefill([prompt])
    warm.decode([int(np.argmax(logits[0]))])
    del warm

    stats = getattr(model.weights, "stats", None)
    times = []
    # One short prefill is at the mercy of a noisy machine: the median of PREFILL_REPEATS, unless the
    # weights stream (each repeat would read the whole model again).
    plan = getattr(model, "plan", None)
    session = None
    for _ in range(1 if plan is not None and plan.streams else PREFILL_REPEATS):
        session = None  # the previous session's KV cache is freed before the next is allocated
        session = model.session(max_len=prompt_n + decode_n)
        t0 = time.perf_counter()
        logits = session.prefill([prompt])
        times.append(time.perf_counter() - t0)
    prefill_s = sorted(times)[len(times) // 2]

    if stats is not None:
        stats.reset()
    kernels.cpu.reset_decode_path()
    io0 = _proc_io()
    tokens = []
    t0 = time.perf_counter()
    for _ in range(decode_n):
        token = int(np.argmax(logits[0]))
        tokens.append(token)
        logits = session.decode([token])
    decode_s = time.perf_counter() - t0
    io1 = _proc_io()

    rchar = (io1.get("rchar", 0) - io0.get("rchar", 0)) / decode_n
    wchar = (io1.get("wchar", 0) - io0.get("wchar", 0)) / decode_n
    engine = stats is not None and stats.groups_consumed > 0  # jmoss streamed: count its own reads
    streamed = stats.bytes_per_forward if engine else rchar
    read_bytes = stats.bytes_read if engine else rchar * decode_n
    resident = resident_weight_bytes(model)
    if resident is not None:  # nothing streamed: what a token costs is reading the weights from RAM
        streamed, read_bytes = resident, resident * decode_n
    threads = str(model.threads or _default_threads())
    config = f"{model.dtype} weights, {model.compute_dtype} activations, {threads} threads"
    if uses_kernels(getattr(model, "ops", None)):
        config += ", AMX-BF16 prefill" if kernels.amx_prefill() else ", fp32 prefill GEMM"
        config += f", {kernels.isa_path()} kernels; decode: {kernels.cpu.describe_decode_path()}"
    share = huge_page_share(resident) if options.get("device", "cpu") == "cpu" else None
    if share is not None:
        config += f"; {share:.0%} of the weights mapped in 2 MiB pages"
    return {
        "name": options.get("name", "jmoss"),
        "config": config,
        "label": f"{threads}T",
        "budget": options["device_memory"],
        "load_s": load_s,
        "prefill_tok_s": prompt_n / prefill_s,
        "decode_tok_s": decode_n / decode_s,
        "bytes_per_token": streamed,
        "written_per_token": wchar,
        "read_gbps": read_bytes / decode_s / 1e9,
        "plan_bytes_per_token": plan.disk_bytes_per_token if plan is not None else None,
        "sync_s_per_token": stats.sync_seconds / decode_n if engine else None,
        "wait_s_per_token": stats.wait_seconds / decode_n if engine else None,
        "tokens": tokens,
    }


def huge_page_bytes(rollup: str = "/proc/self/smaps_rollup") -> int | None:
    """Bytes this process maps in 2 MiB pages (file folios mapped whole, plus anonymous huge pages),
    from /proc/self/smaps_rollup; None where that is not available.

    Decode reads every weight once a token: on 4 KiB pages the TLB misses cost ~15% of the read
    rate on a KVM guest, so a figure against the read probe (numpy memory, 2 MiB pages) says how
    many of the weights were mapped in large pages (a store cached by its own writing, or by a
    reader with small folios, maps in 4 KiB ones until the cache drops it).
    """
    try:
        with open(rollup) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("FilePmdMapped", "AnonHugePages") if k in fields)
    except (OSError, ValueError):
        return None


def huge_page_share(weight_bytes: int | None) -> float | None:
    """The share of ``weight_bytes`` resident weights mapped in 2 MiB pages (``huge_page_bytes``
    over them, at most 1), or None where either is unknown."""
    huge = huge_page_bytes()
    return None if huge is None or not weight_bytes else min(1.0, huge / weight_bytes)


def resident_weight_bytes(model) -> int | None:
    """Weight bytes one decode token reads when every layer and the head are resident, else None.

    The embedding table is left out: a token gathers one row of it.
    """
    from jmoss.engine.resident import ResidentWeights

    if not isinstance(model.weights, ResidentWeights):
        return None
    groups = [model.weights.layer(i) for i in range(model.config.n_layer)] + [model.weights.head()]
    return sum(int(v.numel()) * np.dtype(str(v.dtype)).itemsize for g in groups for v in g.values())


def measure_torch_in_this_process(options: dict[str, Any]) -> Figures:
    """transformers' CodeGenForCausalLM on the store's weights, timed exactly like jmoss's run.

    The store is mapped back to Hugging Face names (``layout.to_hf_state_dict``) and cast to
    ``options["torch_dtype"]``; decode keeps transformers' KV cache and asks for the last
    position's logits only (``logits_to_keep=1``), which is what its own ``generate`` does.
    """
    import torch

    from jmoss import layout
    from jmoss.store import Store, resolve_model

    transformers = _supported_transformers()
    threads = options.get("torch_threads") or _default_threads()
    torch.set_num_threads(threads)
    dtype = getattr(torch, options["torch_dtype"])
    t0 = time.perf_counter()
    store = Store.open(resolve_model(options["model"]))
    config = store.config
    groups = {g: store.group(g) for g in layout.all_groups(config)}
    hf_config = transformers.CodeGenConfig(**{**config.to_dict(), "tie_word_embeddings": False})
    # Only public API: a normally built model (its buffers, e.g. the rotary table, made by its own
    # __init__ wherever a transformers version keeps them), then every parameter replaced by name.
    with torch.no_grad():
        model = transformers.CodeGenForCausalLM(hf_config).to(dtype)
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(dtype)
                 for k, v in layout.to_hf_state_dict(groups, config).items()}
        result = model.load_state_dict(state, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    unloaded = sorted(parameters & set(result.missing_keys))
    if unloaded or result.unexpected_keys:
        raise JmossError(
            f"transformers {transformers.__version__} names CodeGen's weights differently from the store "
            f"(not loaded: {unloaded[:3]}, unknown: {list(result.unexpected_keys)[:3]}); "
            f"--compare torch supports transformers {SUPPORTED_TRANSFORMERS}")
    model.eval()
    load_s = time.perf_counter() - t0
    del groups, state

    prompt_n, decode_n = options["prompt_tokens"], options["decode_tokens"]
    prompt = torch.tensor([[int(t) for t in np.random.default_rng(0).integers(0, config.vocab_size, prompt_n)]])

    def forward(ids, past=None):
        return model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        out = forward(prompt)  # warm-up: oneDNN/ATen pick their kernels for both phases
        forward(out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values)
        del out
        t0 = time.perf_counter()
        out = forward(prompt)
        prefill_s = time.perf_counter() - t0
        tokens = []
        t0 = time.perf_counter()
        for _ in range(decode_n):
            token = out.logits[:, -1].float().argmax(-1, keepdim=True)
            tokens.append(int(token))
            out = forward(token, out.past_key_values)
        decode_s = time.perf_counter() - t0

    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wte" not in n)
    return {
        "name": f"torch {options['torch_dtype']}",
        "config": f"{options['torch_dtype']}, {threads} threads",
        "label": f"{options['torch_dtype']} {threads}T",
        "budget": None,
        "load_s": load_s,
        "prefill_tok_s": prompt_n / prefill_s,
        "decode_tok_s": decode_n / decode_s,
        "bytes_per_token": weight_bytes,
        "written_per_token": 0,
        "read_gbps": weight_bytes * decode_n / decode_s / 1e9,
        "tokens": tokens,
    }


# transformers releases whose CodeGen --compare torch drives through public API only (config,
# CodeGenForCausalLM, load_state_dict by name, forward with logits_to_keep); measured: 5.23.0, 5.24.0.
SUPPORTED_TRANSFORMERS = "5.x"


def _supported_transformers():
    """transformers, imported, or a JmossError that names the versions --compare torch supports."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise JmossError("--compare torch needs transformers: pip install torch 'transformers>=5,<6'") from None
    if version.split(".")[0] != "5":
        raise JmossError(f"--compare torch supports transformers {SUPPORTED_TRANSFORMERS}, found {version}: "
                         "pip install 'transformers>=5,<6'")
    import transformers

    return transformers


def _default_threads() -> int:
    from jmoss.kernels.cpu import _default_threads as kernel_threads

    return kernel_threads()


def stop_for_measurement() -> None:
    """Called by a measured child as its last act: stop, so the parent can read its peak RSS."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP)


def spawn_measured(cmd: list[str], *, env: dict[str, str] | None = None, log=None) -> tuple[int, int | None]:
    """Run ``cmd`` (which ends with ``stop_for_measurement()``); return (exit code, peak RSS bytes).

    The peak is the child's ``VmHWM`` read from /proc/<pid>/status by this process while the
    child is stopped at its end. ``ru_maxrss`` from wait4 would be wrong: Linux carries the
    parent's RSS at spawn into the child's high-water mark across exec (measured: a parent
    holding 300 MiB made ``python -c pass`` report 327 MiB).
    """
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    peak = None
    while True:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
            os.kill(proc.pid, signal.SIGCONT)
            continue
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, peak


def spawn_measured_memory(cmd: list[str], *, env: dict[str, str] | None = None, log=None,
                          every: float = 0.002) -> tuple[int, dict[str, int | None]]:
    """``spawn_measured`` that also reports anonymous memory: (exit code, {"peak_rss", "peak_anon",
    "anon_at_end", "file_at_end"}).

    ``peak_rss`` is ``VmHWM`` at the stop, as in ``spawn_measured``; it counts the page-cache pages
    the child mapped (mapped weights) as much as memory it allocated. The kernel keeps no peak of
    the anonymous part alone, so ``peak_anon`` is the largest ``RssAnon`` seen by sampling
    /proc/<pid>/status every ``every`` seconds while the child runs (and at its stop): what the
    process itself allocated, which mapped store pages are not.
    """
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    figures: dict[str, int | None] = {"peak_rss": None, "peak_anon": 0, "anon_at_end": None, "file_at_end": None}
    done = threading.Event()

    def status() -> dict[str, int]:
        try:
            lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        except OSError:
            return {}
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines)
                if k in ("VmHWM", "RssAnon", "RssFile")}

    def sample() -> None:
        while not done.is_set():
            figures["peak_anon"] = max(figures["peak_anon"] or 0, status().get("RssAnon", 0))
            time.sleep(every)

    sampler = threading.Thread(target=sample, name="jmoss-memory-sampler", daemon=True)
    sampler.start()
    try:
        while True:
            _, code = os.waitpid(proc.pid, os.WUNTRACED)
            if os.WIFSTOPPED(code):
                now = status()
                figures.update(peak_rss=now.get("VmHWM"), anon_at_end=now.get("RssAnon"), file_at_end=now.get("RssFile"))
                figures["peak_anon"] = max(figures["peak_anon"] or 0, now.get("RssAnon", 0))
                os.kill(proc.pid, signal.SIGCONT)
                continue
            proc.returncode = os.waitstatus_to_exitcode(code)
            return proc.returncode, figures
    finally:
        done.set()
        sampler.join()


def run_child(options: dict[str, Any], env: dict[str, str] | None = None) -> Figures:
    """Run ``measure_in_this_process`` in a fresh interpreter; add its peak RSS measured from here."""
    from jmoss.errors import JmossError

    with tempfile.TemporaryDirectory(prefix="jmoss-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        with open(Path(tmp) / "log.txt", "w+") as log:
            code, peak = spawn_measured([sys.executable, "-m", "jmoss.bench", json.dumps(options), str(out)],
                                        env=env, log=log)
            log.seek(0)
            output = log.read()
        if code != 0 or not out.exists() or peak is None:
            raise JmossError(f"bench run {options.get('name')} failed (exit {code}):\n" + output[-4000:])
        figures = json.loads(out.read_text())
    figures["peak_rss"] = peak
    return figures


# ------------------------------------------------------------------------------ comparisons


def compare_jittor(options: dict[str, Any]) -> Figures:
    """Same model, budget and tokens under Jittor's native swap (its own save-mem build)."""
    from jmoss.jittor_setup import SAVE_MEM_ENV

    if options["device"] != "cpu":
        from jmoss.errors import DeviceError

        raise DeviceError("--compare jittor runs Jittor's CPU swap (its CUDA disk path is broken, jittor-notes §2.2)")
    return run_child({**options, "swap": "jittor", "name": "jittor swap"}, env={SAVE_MEM_ENV: "1"})


TORCH_DTYPES = ("float32", "bfloat16", "float16")


def compare_torch(options: dict[str, Any]) -> Figures:
    """transformers' CodeGen on the same weights and tokens, in its best CPU configuration.

    Each dtype in ``TORCH_DTYPES`` runs in its own process (torch.set_num_threads = the same
    thread count jmoss's kernels use); the one with the fastest decode is the row, and every
    configuration's figures go in its note, so nothing about the choice is hidden.
    """
    import importlib.util

    from jmoss.errors import DeviceError

    if options["device"] != "cpu":
        raise DeviceError("--compare torch runs transformers on the CPU; use --device cpu")
    if options.get("device_memory") is not None:
        raise JmossError("--compare torch compares everything resident; leave out --device-memory")
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise JmossError(f"--compare torch needs {' and '.join(missing)}: pip install torch 'transformers>=5,<6'")
    _supported_transformers()
    runs = [run_child({**options, "runner": "torch", "torch_dtype": d, "torch_threads": t})
            for d in TORCH_DTYPES for t in options.get("thread_counts") or (None,)]
    return best_of(runs, "torch")


def best_of(runs: list[Figures], what: str) -> Figures:
    """The run with the fastest decode, renamed for its configuration, the others listed in its note."""
    best = dict(max(runs, key=lambda r: r["decode_tok_s"]))
    if len(runs) > 1:
        best["name"] = f"{what} {best['label']}"
        best["note"] = "configurations measured, prefill / decode tok/s: " + "; ".join(
            f"{r['config']}: {r['prefill_tok_s']:.1f} / {r['decode_tok_s']:.2f}" for r in runs)
        best["configs"] = [{k: r[k] for k in ("config", "prefill_tok_s", "decode_tok_s", "read_gbps", "peak_rss")}
                           for r in runs]
    return best


# name -> function(options) -> figures
COMPARISONS: dict[str, Callable[[dict[str, Any]], Figures]] = {"jittor": compare_jittor, "torch": compare_torch}


def memory_bound(threads: int | None = None) -> Figures:
    """The bound for resident CPU runs: the kernels' memory read probe (same threads, 1 GiB buffer)."""
    from jmoss import kernels

    nbytes = 1 << 30
    threads = threads or kernels.info()["threads"]
    return {"what": f"memory read probe (jmoss.kernels, {threads} threads)",
            "gbps": kernels.memory_read_probe(nbytes, threads=threads), "bytes": nbytes}


def run_bench(model: str, *, device: str = "cpu", device_memory: int | None = None, host_memory: int | None = None,
              prompt_tokens: int = 64, decode_tokens: int = 16, compare: tuple[str, ...] = (),
              threads: int | None = None, offload: str = "auto") -> tuple[Figures, list[Figures]]:
    """(bound, rows): the measured bound, then jmoss's run and one row per comparison; on
    ``threads`` CPU threads (default: JMOSS_THREADS, else the CPUs this process may run on)."""
    options = {"model": str(model), "device": device, "device_memory": device_memory, "host_memory": host_memory,
               "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
               "max_seq_len": prompt_tokens + decode_tokens, "threads": threads, "offload": offload}
    if "torch" in compare:
        # Both sides in their best CPU configuration: each is measured at 1 thread and at the
        # default count, and its best is shown (transformers' OpenMP team loses most of its speed
        # on a busy machine; jmoss's pool does not, but the comparison is made the same way).
        options["thread_counts"] = sorted({1, threads or _default_threads()})
    if device == "cuda":
        from jmoss.engine.cuda import pinned_h2d_bound

        bound = pinned_h2d_bound()
    elif device_memory is None:
        bound = memory_bound(threads)
    else:
        bound = store_read_bound(model)
    jmoss_runs = [run_child({**options, "name": "jmoss engine", "threads": t or threads})
                  for t in options.get("thread_counts") or (None,)]
    rows = [best_of(jmoss_runs, "jmoss")]
    for name in compare:
        rows.append(COMPARISONS[name](options))
    return bound, rows


def format_table(bound: Figures, rows: list[Figures]) -> str:
    """The side-by-side table `jmoss bench` prints."""
    header = ("run", "budget", "prefill tok/s", "decode tok/s", "MB read/token", "MB written/token",
              f"read GB/s (bound {bound['gbps']:.2f})", "peak RSS", "same tokens")
    reference = rows[0]["tokens"]
    lines = []
    for r in rows:
        lines.append((
            r["name"],
            format_size(r["budget"]) if r.get("budget") is not None else "none",
            f"{r['prefill_tok_s']:.2f}",
            f"{r['decode_tok_s']:.3f}",
            f"{r['bytes_per_token'] / 1e6:.1f}",
            f"{r.get('written_per_token', 0) / 1e6:.1f}",
            f"{r['read_gbps']:.2f} ({r['read_gbps'] / bound['gbps'] * 100:.0f}%)" if bound["gbps"] else f"{r['read_gbps']:.2f}",
            format_size(r["peak_rss"]),
            "yes" if r["tokens"] == reference else "NO",
        ))
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [f"bound: {bound['what']}: {bound['gbps']:.2f} GB/s over {bound['bytes'] / 1e6:.0f} MB", "",
           fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in lines]
    extra = [r for r in rows if r.get("sync_s_per_token") is not None]
    out += [f"{r['name']}: {r['config']}" for r in rows if r.get("config") and not r.get("note")]
    out += [f"{r['name']}: {r['note']}" for r in rows if r.get("note")]
    for r in extra:
        out.append(f"{r['name']}: layer-boundary sync {r['sync_s_per_token'] * 1e3:.1f} ms/token (includes the "
                   f"compute it runs), waiting for reads {r['wait_s_per_token'] * 1e3:.1f} ms/token; plan says "
                   f"{(r['plan_bytes_per_token'] or 0) / 1e6:.1f} MB/token")
    return "\n".join(out)


def _child_entry(argv: list[str]) -> int:
    options, out = json.loads(argv[0]), Path(argv[1])
    measure = measure_torch_in_this_process if options.get("runner") == "torch" else measure_in_this_process
    figures = measure(options)
    out.write_text(json.dumps(figures))
    stop_for_measurement()
    return 0


if __name__ == "__main__":
    sys.exit(_child_entry(sys.argv[1:]))
