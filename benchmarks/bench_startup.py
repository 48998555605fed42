"""How long a start takes: `jmoss generate STORE "hi" --max-new-tokens 1` from a warm and a cold page
cache, the cold load's read rate against `dd` of the same files, and each load's anonymous memory
(issue #33).

Per store, in one run (run it under `flock /work/heavy.lock`: it evicts the store's pages, which
slows anyone else reading the same files, and maps up to the whole store):

- warm: the generate command twice in a row, each a fresh process timed from outside (wall clock,
  fork to exit); the second is the figure (the first may find the cache cold);
- cold: the store's pages evicted (``posix_fadvise(DONTNEED)`` on every file), then ``dd`` of its
  safetensors files one after another (``bs=16M``, the disk's sequential read); evicted again, a
  process that times ``jmoss.load`` (and, inside it, ``Store.map_groups``: mapping, reading and
  hashing every group); MB/s = the files' bytes over each; evicted once more, the generate command
  cold;
- memory: each child's peak ``RssAnon`` (sampled from /proc every 2 ms by this process: the
  anonymous memory the process allocated, which mapped weights are not) and ``VmHWM`` (peak RSS,
  page-cache pages it mapped included), against the store's weights.

A store without tokenizer files (the random MOSS-16B-shaped ones) is given MOSS's through a sibling
store of hard links (``--tokenizer-from``): the same inodes, so the same pages are cached and
evicted, plus the tokenizer files and a manifest listing them, written as `jmoss convert` writes
them; the original store is not touched.

    flock /work/heavy.lock python benchmarks/bench_startup.py --store int4=/work/stores/moss16b-int4 \\
        --store fp16-350m=/work/stores/codegen-350M-random --tokenizer-from /work/shared/assets \\
        --out benchmarks/results/startup-<date>.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jmoss
from jmoss.store import Store
spent = [0.0]
real = Store.map_groups
def timed(self, *a, **k):
    s = time.perf_counter()
    try:
        return real(self, *a, **k)
    finally:
        spent[0] += time.perf_counter() - s
Store.map_groups = timed
t1 = time.perf_counter()
model = jmoss.load(sys.argv[1], device="cpu")
t2 = time.perf_counter()
print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "map_s": spent[0],
                              "mapped": bool(getattr(model.weights, "mapped", False)),
                              "resident_bytes": model.plan.resident_bytes}), flush=True)
"""


def store_files(store: Path) -> list[Path]:
    return sorted(store.glob("*.safetensors"))


def evict(store: Path) -> None:
    for f in store_files(store):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd_mbps(store: Path) -> float:
    files = store_files(store)
    total = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return total / (time.perf_counter() - t0) / 1e6


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds from spawn to exit, and its peak RssAnon / VmHWM sampled meanwhile."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    peak = {"RssAnon": 0, "VmHWM": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _status(proc.pid).items():
                peak[key] = max(peak[key], value)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_anon": peak["RssAnon"], "peak_rss": peak["VmHWM"], "peak_file": peak["RssFile"],
            "stdout": out, "stderr": err}


def with_tokenizer(store: Path, assets: Path, root: Path) -> Path:
    """``store`` itself when it has tokenizer files, else a hard-linked sibling under ``root`` that
    has MOSS's (from ``assets``, as tests/moss_fixtures.py assembles them), listed in its manifest."""
    from jmoss import layout
    from jmoss.store import MANIFEST, TOKENIZER_FILES, Store, finalize_store, read_manifest

    manifest = read_manifest(store)
    if any(name in manifest["files"] for name in TOKENIZER_FILES):
        return store
    out = root / f"{store.name}+moss-tokenizer"
    if (out / MANIFEST).is_file():
        return out
    config = Store.open(store).config
    out.mkdir(parents=True, exist_ok=True)
    for g in layout.all_groups(config):
        name = layout.group_file(g)
        if not (out / name).exists():
            os.link(store / name, out / name)  # the same inode: nothing copied, the same page cache
    tok = root / f"{store.name}+moss-tokenizer.files"
    tok.mkdir(exist_ok=True)
    int8 = assets / "moss-moon-003-sft-int8"
    shutil.copy(int8 / "vocab.reconstructed.json", tok / "vocab.json")
    for name in ("merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(int8 / name, tok / name)
    shutil.copy(assets / "moss-moon-003-sft-int4" / "tokenizer_config.json", tok / "tokenizer_config.json")
    records = {g: manifest["files"][layout.group_file(g)] for g in layout.all_groups(config)}
    finalize_store(out, config, records, tokenizer_dir=tok, source={**manifest.get("source", {}),
                                                                   "tokenizer": "MOSS's, added by bench_startup"})
    Store.open(out)  # checks the result (sizes, small files' hashes, exactly the files it lists)
    return out


def measure(label: str, store: Path, report) -> None:
    from jmoss.store import Store

    files = store_files(store)
    total = sum(f.stat().st_size for f in files)
    s = Store.open(store)
    weights = sum(s.group_data_span(g)[1] for g in s.groups())
    jmoss_cli = [sys.executable, "-m", "jmoss.cli"]
    generate = [*jmoss_cli, "generate", str(store), "hi", "--max-new-tokens", "1", "--greedy"]
    report(f"\n## {label}: {store} ({len(files)} files, {total / 1e9:.2f} GB; weights {weights / 1e9:.2f} GB)")

    runs = [run_measured(generate) for _ in range(2)]
    for i, r in enumerate(runs, 1):
        report(f"warm generate run {i}: {r['wall_s']:.2f} s wall; peak RssAnon {r['peak_anon'] / 2**20:.0f} MiB "
               f"({r['peak_anon'] / weights:.1%} of the weights), peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
               f"(load avg {os.getloadavg()[0]:.1f})")
    report(f"  -> warm figure (second run): {runs[1]['wall_s']:.2f} s (goal <= 5 s)")

    evict(store)
    dd = dd_mbps(store)
    report(f"cold dd of the files (bs=16M, one after another): {dd:.0f} MB/s (load avg {os.getloadavg()[0]:.1f})")
    evict(store)
    r = run_measured([sys.executable, "-c", LOAD_CHILD, str(store)])
    res = json.loads(next(line for line in r["stdout"].splitlines() if line.startswith("RESULT "))[7:])
    load_mbps, map_mbps = total / res["load_s"] / 1e6, total / res["map_s"] / 1e6 if res["map_s"] else 0.0
    report(f"cold jmoss.load: {res['load_s']:.2f} s = {load_mbps:.0f} MB/s ({load_mbps / dd:.0%} of dd); "
           f"of which Store.map_groups (map + read + hash every group) {res['map_s']:.2f} s = {map_mbps:.0f} MB/s "
           f"({map_mbps / dd:.0%} of dd; goal >= 70%); mapped={res['mapped']}; peak RssAnon "
           f"{r['peak_anon'] / 2**20:.0f} MiB ({r['peak_anon'] / weights:.1%} of the weights), peak RSS "
           f"{r['peak_rss'] / 2**20:.0f} MiB (load avg {os.getloadavg()[0]:.1f})")
    evict(store)
    r = run_measured(generate)
    report(f"cold generate: {r['wall_s']:.2f} s wall; peak RssAnon {r['peak_anon'] / 2**20:.0f} MiB "
           f"(load avg {os.getloadavg()[0]:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", action="append", required=True, help="LABEL=PATH")
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="shared assets folder with MOSS's tokenizer files, for stores without any")
    parser.add_argument("--work", type=Path, default=None, help="where tokenizer siblings go (default: JMOSS_HOME/bench-stores)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()

    from jmoss.home import jmoss_home

    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report(f"# bench_startup {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; commit {commit}; {cpu}, "
           f"{len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()}")
    work = args.work or jmoss_home() / "bench-stores"
    for spec in args.store:
        label, _, path = spec.partition("=")
        store = Path(path)
        if args.tokenizer_from is not None:
            store = with_tokenizer(store, args.tokenizer_from, work)
        measure(label, store, report)
    report(f"# load average after {os.getloadavg()}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
