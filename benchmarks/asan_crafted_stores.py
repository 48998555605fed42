"""Run the crafted-store loads against kernels built with AddressSanitizer (issue #26), once.

jmoss's CPU kernels (and every other op Jittor compiles at run time) are built by Jittor's JIT with
``jt.flags.cc_flags``; here a child process appends ``-fsanitize=address`` to it right after
importing Jittor, so every kernel it compiles is instrumented (its own cache entries: the flags are
part of Jittor's cache key; Jittor's prebuilt core is not instrumented). libasan is preloaded into
the child (Python itself is not built with it), Jittor's caching allocators are switched off
(``use_sfrl_allocator=0 use_temp_allocator=0``) so each Var is its own malloc with ASan's redzones,
and ``halt_on_error=1`` makes any report end the child with an ASan exit status.

Steps, each a fresh child:
  control   a deliberate one-element over-read in a jt.code kernel: ASan must report it (proves the setup)
  kernels   quant_linear with out-of-range perms, every ISA path, both widths, GEMV/panel/int8-compute
  pristine  each base store (fp16, int4, int4 with a 4-bit head, int8) loaded, all resident and streamed
  checked   the crafted stores tests/test_store_check.py loads in a child (crafted_stores.child_cases):
            every perm/scales/zeros tensor of every file and format, all refused by the store check
  bypassed  the same with the value checks switched off: the kernels meet the bad values themselves

    python benchmarks/asan_crafted_stores.py [WORKDIR]     # results: benchmarks/results/asan-crafted-stores.txt
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASAN_FLAGS = " -fsanitize=address -fno-omit-frame-pointer -g"

# Two things in Jittor's core that ASan's runtime refuses, fixed by this shim preloaded before
# libasan: it loads its core and every JIT kernel with RTLD_DEEPBIND (google/sanitizers#611; the
# flag is dropped: no torch is loaded in these processes, whose symbol clashes it guards against),
# and its aligned allocator asks aligned_alloc for sizes that are not multiples of the alignment
# (glibc allows it; ASan aborts): served by posix_memalign with the exact size, so ASan's redzones
# still start at the end of each Var.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
void* dlopen(const char* file, int mode) {
    static void* (*next)(const char*, int) = 0;
    if (!next) next = (void* (*)(const char*, int))dlsym(RTLD_NEXT, "dlopen");
    return next(file, mode & ~RTLD_DEEPBIND);
}
void* aligned_alloc(size_t alignment, size_t size) {
    void* p = 0;
    return posix_memalign(&p, alignment < sizeof(void*) ? sizeof(void*) : alignment, size) ? 0 : p;
}
"""

PRELUDE = textwrap.dedent(
    f"""
    import os, sys
    os.RTLD_DEEPBIND = 0  # jittor's Python-side dlopen flags
    os.environ.pop("LD_PRELOAD")  # this process has ASan; the compilers and gdb jittor spawns must not
    sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]
    from jmoss.jittor_setup import get_jittor
    jt = get_jittor("cpu")
    jt.flags.cc_flags = jt.flags.cc_flags + {ASAN_FLAGS!r}
    """
)

STEPS = {
    "control": """
import numpy as np
x = jt.array(np.ones(16, np.float32)) + 1  # computed: a Var of its own allocation (jt.array's may be padded)
y = jt.code([1], "float32", [x], cpu_src="out0_p[0] = in0_p[in0_shape0];")  # one element past the end
print(float(y.numpy()[0]))
""",
    "kernels": """
import numpy as np
from jmoss import kernels
from jmoss.converters import gptq
rng = np.random.default_rng(0)
n, k, gs = 40, 96, 32
count = 0
for bits in (4, 8):
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s, z = gptq.quantize_rows(w, bits, gs)
    perm = rng.permutation(k).astype(np.int32)
    for isa in ("native", "avx2", "portable"):
        for value in (k, -1, 2**31 - 1, -(2**31)):
            bad = perm.copy(); bad[k // 2] = value
            for m in (1, 5, 20):
                for compute in ("fp32", "int8"):
                    with kernels.configured(isa=isa, quant_compute=compute):
                        got = kernels.quant_linear(jt.array(rng.standard_normal((m, k)).astype(np.float32)), jt.array(bad),
                                                   jt.array(q), jt.array(s), jt.array(z), bits=bits, group_size=gs).numpy()
                    assert np.isnan(got).all()
                    count += 1
print(f"{count} out-of-range quant_linear calls: NaN output, no report")
""",
    "pristine": """
import numpy as np, jmoss
import crafted_stores as cs
from jmoss.placement import plan_placement
from jmoss.config import MossConfig
for fmt in cs.FORMATS:
    path = ROOT_DIR / fmt
    config = MossConfig.from_json_file(path / "config.json")
    for budget in (None, plan_placement(config, device="cpu", device_memory=1 << 40, host_memory=None, max_seq_len=24).minimum_device_bytes):
        m = jmoss.load(str(path), device="cpu", device_memory=budget, max_seq_len=24)
        assert np.isfinite(m.logits(np.arange(20).reshape(1, 20) % 96)).all()  # 20 rows: the per-op prefill path
        session = m.session(max_len=24)
        logits = session.prefill([[1, 2, 3, 4]])  # 4 rows: the fused decode_block
        for _ in range(8):
            logits = session.decode([int(np.argmax(logits[0]))])
        assert np.isfinite(logits).all()
        print(fmt, "resident" if budget is None else "streamed", "ok", flush=True)
""",
    "checked": None,
    "bypassed": None,
}


def run(step: str, workdir: Path, env: dict) -> tuple[int, str, float]:
    if STEPS[step] is None:
        code = PRELUDE + textwrap.dedent(f"""
            import runpy
            sys.argv = ["crafted_stores.py", {str(workdir)!r}] + (["--bypass-value-checks"] if {step == "bypassed"} else [])
            runpy.run_path({str(ROOT / "tests" / "crafted_stores.py")!r}, run_name="__main__")
            """)
    else:
        code = PRELUDE + f"from pathlib import Path\nROOT_DIR = Path({str(workdir)!r})\n" + STEPS[step]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=7200)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def main() -> None:
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("TMPDIR", "/tmp")) / "jmoss-asan-crafted"
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    import crafted_stores as cs

    if not (workdir / "fp16").is_dir():
        workdir.mkdir(parents=True, exist_ok=True)
        cs.build_bases(workdir)
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    (workdir / "nodeepbind.c").write_text(SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(workdir / "nodeepbind.so"), str(workdir / "nodeepbind.c"), "-ldl"],
                   check=True)
    env = {**os.environ, "LD_PRELOAD": f"{workdir / 'nodeepbind.so'}:{libasan}", "use_sfrl_allocator": "0",
           "use_temp_allocator": "0",
           "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:"
                           "verify_asan_link_order=0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    bases = {fmt: workdir / fmt for fmt in cs.FORMATS}
    n_cases = len(cs.cases(bases))
    n_kernel = len(cs.child_cases(cs.cases(bases)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    lines = [f"python benchmarks/asan_crafted_stores.py  ({datetime.date.today()}, commit {commit}, {libasan}, "
             f"load average {os.getloadavg()[0]:.1f})",
             f"crafted cases generated: {n_cases}; {n_kernel} loaded by jmoss.load (one per perm/scales/zeros tensor of "
             "every file and format), each all resident and streamed"]
    for step in STEPS:
        first = len(lines)
        rc, output, seconds = run(step, workdir, env)
        reports = output.count("ERROR: AddressSanitizer")
        summary = next((ln for ln in output.splitlines() if ln.startswith("SUMMARY: AddressSanitizer")), "")
        loads = sum(1 for ln in output.splitlines() if ln.startswith('{"case"'))
        lines.append(f"{step:9s} exit {rc:3d}  ASan reports {reports}  {summary}  "
                     f"{f'{loads} loads  ' if loads else ''}{seconds:.0f} s")
        if step == "control" or rc != 0:
            lines += ["    " + ln.strip() for ln in output.splitlines()
                      if "AddressSanitizer" in ln or ln.strip().startswith(("#0 ", "#1 ", "#2 "))][:8]
            if rc != 0 and not reports:
                lines += ["    " + ln for ln in output.splitlines()[-8:]]
        print("\n".join(lines[first:]), flush=True)
    out = ROOT / "benchmarks" / "results" / "asan-crafted-stores.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
