"""Peak RSS of converting to and loading a packed (int8 / int4) store, measured from outside.

CodeGen-350M shape (benchmarks/make_codegen350m_store.py, random weights, seed 0), written back
as a Hugging Face fp16 checkpoint (jmoss.bench_quant.export_hf_checkpoint). Each step runs in its
own child process; the parent reads the child's ``VmHWM`` while the child is stopped at its end
(jmoss.bench.spawn_measured), so nothing the child forgets to count is missed:

- ``convert --quantize intN`` (+ packed lm_head and int8 wte, the default) against a child that
  only imports the converter: the difference is what converting holds at its peak;
- ``jmoss.load`` of the store, everything resident on the CPU, then a 64-token prefill and 8
  decode steps. The child resets its own high-water mark after the load (``/proc/self/clear_refs``
  5) and records it after the forward, so the forward's peak over the loaded state is known
  exactly: a dequantized copy of any Linear (fp32 fc_in 16.8 MB, lm_head 210 MB) would show.

    PYTHONPATH=$PWD JMOSS_THREADS=2 python benchmarks/measure_packed_memory.py [WORKDIR]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MB = 1e6

LOAD_CHILD = r"""
import json, sys, numpy as np
from pathlib import Path
from jmoss.bench import stop_for_measurement, resident_weight_bytes
def status():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out
from jmoss.jittor_setup import get_jittor
get_jittor("cpu")
from jmoss import kernels
kernels.available()  # compiles/loads the kernels before the baseline
stages = {"imported": status()}
import jmoss
model = jmoss.load(sys.argv[1], device="cpu")
stages["loaded"] = status()
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: what follows is the forward's own peak
session = model.session(max_len=72)
logits = session.prefill([[int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, 64)]])
for _ in range(8):
    logits = session.decode([int(np.argmax(logits[0]))])
stages["forward"] = status()
stages["weight_bytes"] = resident_weight_bytes(model)
Path(sys.argv[2]).write_text(json.dumps(stages))
stop_for_measurement()
"""

CONVERT_CHILD = r"""
import sys
from jmoss.bench import stop_for_measurement
from jmoss.converters.convert import convert
if sys.argv[2] != "-":
    convert(sys.argv[1], sys.argv[2], progress=False, quantize=sys.argv[3] if sys.argv[3] != "fp16" else None)
stop_for_measurement()
"""


def measured(code: str, *args: str) -> int:
    from jmoss.bench import spawn_measured

    with tempfile.TemporaryFile("w+") as log:
        rc, peak = spawn_measured([sys.executable, "-c", code, *args], log=log)
        log.seek(0)
        if rc != 0 or peak is None:
            raise SystemExit(f"child failed (exit {rc}):\n{log.read()[-3000:]}")
    return peak


def main() -> None:
    from make_codegen350m_store import build

    from jmoss.bench_quant import export_hf_checkpoint
    from jmoss import layout
    from jmoss.store import Store

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/jmoss-packed-memory")
    fp16 = work / "jmoss-fp16"
    if not (fp16 / "jmoss.json").exists():
        build(fp16)
    hf = export_hf_checkpoint(fp16, work / "hf")
    config = Store.open(fp16).config
    largest = max(int(a.nbytes) for g in layout.all_groups(config) for a in Store.open(fp16).group(g).values())
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    print(f"CodeGen-350M shape (random, seed 0); CPU: {cpu}; source {hf} (fp16, largest tensor {largest / MB:.1f} MB)")
    base = measured(CONVERT_CHILD, str(hf), "-", "-")
    print(f"baseline (interpreter + converter imported): peak RSS {base / MB:.1f} MB\n")
    print("MB (1e6 bytes). convert peak: the converting child's VmHWM; over base: less the baseline child.")
    print("load: RSS after jmoss.load less RSS before it (jittor and kernels already loaded); load peak: VmHWM at")
    print("that point less the same; weights: the resident weight bytes (layers + head). forward: VmHWM of a")
    print("64-token prefill + 8 decode steps over the loaded RSS (HWM reset after the load), anon part in brackets.\n")
    print(f"{'store':<7}{'store':>8}{'convert peak':>14}{'over base':>11}{'load':>8}{'load peak':>11}{'weights':>9}"
          f"{'forward':>9}{'(anon)':>9}")
    for fmt in ("fp16", "int8", "int4"):
        store = fp16 if fmt == "fp16" else work / f"jmoss-{fmt}"
        conv = None
        if fmt != "fp16":  # converted afresh each time, so the peak is a whole conversion's
            shutil.rmtree(store, ignore_errors=True)
            conv = measured(CONVERT_CHILD, str(hf), str(store), fmt)
        cfg = Store.open(store).config
        size = layout.store_nbytes(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "stages.json"
            peak = measured(LOAD_CHILD, str(store), str(out))
            stages = json.loads(out.read_text())
        before = stages["imported"]["VmRSS"]
        loaded = stages["loaded"]["VmRSS"] - before
        load_peak = stages["loaded"]["VmHWM"] - before
        forward = stages["forward"]["VmHWM"] - stages["loaded"]["VmRSS"]
        forward_anon = stages["forward"]["RssAnon"] - stages["loaded"]["RssAnon"]
        assert peak >= stages["forward"]["VmHWM"]  # the parent's reading from outside bounds the child's own
        conv_text = f"{conv / MB:>14.1f}{(conv - base) / MB:>11.1f}" if conv else f"{'(source)':>14}{'':>11}"
        print(f"{fmt:<7}{size / MB:>8.1f}{conv_text}{loaded / MB:>8.1f}{load_peak / MB:>11.1f}"
              f"{stages['weight_bytes'] / MB:>9.1f}{forward / MB:>9.1f}{forward_anon / MB:>9.1f}")


if __name__ == "__main__":
    main()
