"""``jmoss bench``: what a user compares, each run measured the same way in its own process.

For every run (jmoss's streaming engine, and with ``--compare jittor`` Jittor's native swap on the
same model, budget, prompt and greedy decode) a fresh child process loads the model, warms up
(JIT compiles), then times a prefill of ``prompt_tokens`` and ``decode_tokens`` greedy decode
steps. The parent measures the child's peak RSS from outside (its ``VmHWM``, read while the child
is stopped at its end; see ``spawn_measured``), so nothing the child forgets to count is missed. Printed side by side:

- prefill and decode tok/s;
- bytes streamed per decode token (the engine's own count; for the jittor run, the bytes its
  swap read back through ``read()`` per token, from /proc/self/io ``rchar``) and the bytes it
  wrote (jittor's swap rewrites evicted weights; jmoss never writes);
- achieved read GB/s during decode next to the measured bound of this machine: on CPU a
  sequential ``preadv`` of the store's layer files into one reused buffer after dropping them
  from the page cache (``posix_fadvise(DONTNEED)``), i.e. what the disk path gives a perfect
  reader; on CUDA the pinned host-to-device copy rate (jmoss.engine_cuda);
- peak RSS against the budget.

A comparison is a function ``(options) -> figures dict`` registered in ``COMPARISONS``; the
``torch`` (transformers CPU) comparison plugs in there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jmoss.sizes import format_size

Figures = dict[str, Any]


# ------------------------------------------------------------------------------ the bound


def store_read_bound(model: str | Path, repeats: int = 2) -> Figures:
    """GB/s of a cold sequential read of the store's layer and head files (the CPU engine's path).

    Each group's data span is read with one ``preadv`` into a single reused buffer, after its
    pages were dropped from the cache, exactly as the engine reads; the best of ``repeats``.
    """
    from jmoss.converters.layout import EMBED, all_groups
    from jmoss.engine import _fadvise_dontneed, read_span
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


def measure_in_this_process(options: dict[str, Any]) -> Figures:
    """Load, warm up, time prefill and greedy decode; runs inside the child process."""
    import jmoss

    t0 = time.perf_counter()
    model = jmoss.load(options["model"], device=options["device"], device_memory=options["device_memory"],
                       host_memory=options.get("host_memory"), max_seq_len=options.get("max_seq_len"),
                       swap=options.get("swap"))
    load_s = time.perf_counter() - t0
    prompt_n, decode_n = options["prompt_tokens"], options["decode_tokens"]
    vocab = model.config.vocab_size
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, prompt_n)]

    warm = model.session(max_len=prompt_n + decode_n)  # compiles every kernel both phases use
    logits = warm.prefill([prompt])
    warm.decode([int(np.argmax(logits[0]))])
    del warm

    stats = getattr(model.weights, "stats", None)
    session = model.session(max_len=prompt_n + decode_n)
    t0 = time.perf_counter()
    logits = session.prefill([prompt])
    prefill_s = time.perf_counter() - t0

    if stats is not None:
        stats.reset()
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
    plan = getattr(model, "plan", None)
    return {
        "name": options.get("name", "jmoss"),
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


# name -> function(options) -> figures; "torch" (transformers on CPU) is added by the kernels work.
COMPARISONS: dict[str, Callable[[dict[str, Any]], Figures]] = {"jittor": compare_jittor}


def run_bench(model: str, *, device: str = "cpu", device_memory: int | None = None, host_memory: int | None = None,
              prompt_tokens: int = 64, decode_tokens: int = 16, compare: tuple[str, ...] = ()) -> tuple[Figures, list[Figures]]:
    """(bound, rows): the measured bound, then jmoss's run and one row per comparison."""
    options = {"model": str(model), "device": device, "device_memory": device_memory, "host_memory": host_memory,
               "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
               "max_seq_len": prompt_tokens + decode_tokens}
    if device == "cuda":
        from jmoss.engine_cuda import pinned_h2d_bound

        bound = pinned_h2d_bound()
    else:
        bound = store_read_bound(model)
    rows = [run_child({**options, "name": "jmoss engine"})]
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
    for r in extra:
        out.append(f"{r['name']}: layer-boundary sync {r['sync_s_per_token'] * 1e3:.1f} ms/token (includes the "
                   f"compute it runs), waiting for reads {r['wait_s_per_token'] * 1e3:.1f} ms/token; plan says "
                   f"{(r['plan_bytes_per_token'] or 0) / 1e6:.1f} MB/token")
    return "\n".join(out)


def _child_entry(argv: list[str]) -> int:
    options, out = json.loads(argv[0]), Path(argv[1])
    figures = measure_in_this_process(options)
    out.write_text(json.dumps(figures))
    stop_for_measurement()
    return 0


if __name__ == "__main__":
    sys.exit(_child_entry(sys.argv[1:]))
