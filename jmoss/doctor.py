"""``jmoss doctor``: what Jittor needs on this machine, and what would go wrong, before it does.

Jittor's first import compiles its core, may download oneDNN / cutt / cutlass / nccl / a CUDA
toolkit, and does not build against CUDA 13 (jittor-notes §1). This report reads the machine
without importing jittor's CUDA side, so it also works where that import would fail.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

from jmoss import cuda_fix
from jmoss.home import jmoss_home
from jmoss.jittor_setup import cuda_device_count, cuda_toolkit_usable, find_nvcc, jittor_home, nvcc_version

# What a plain `import jittor` fetches, and the switch jmoss sets so it does not (jittor-notes §1.1).
JITTOR_DOWNLOADS = [
    ("oneDNN (dnnl 2.2.0)", "every import unless use_mkl=0", "use_mkl=0"),
    ("cutt", "every CUDA import", "use_cutt=0"),
    ("cutlass", "every CUDA import", "use_cutlass=0"),
    ("nccl", "CUDA import when mpicc is found", "use_nccl=0, use_mpi=0"),
    ("jtcuda toolkit (multi-GB)", "a driver is present but no nvcc is found", "nvcc_path"),
]

CUDA13_PROBLEMS = [
    "helper_cuda.h reads cudaDeviceProp.computeMode and .clockRate, removed in CUDA 13: the core does not compile",
    "nvcc gets -std=c++14 but CCCL 3 needs C++17: every cub/thrust kernel (softmax, where, argsort, argmax, cumsum, "
    "topk) fails",
    "CCCL 3 dropped cub::Max (CUDA softmax) and cub::CountingInputIterator / TransformInputIterator (cub_where_op)",
    "cuda_limits.h includes <npp.h>: the toolkit needs the NPP headers (pip: nvidia-npp)",
]


def _version(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed to run: {exc}"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


def report(cuda: bool | None = None) -> list[tuple[str, str]]:
    """(label, value) lines describing this machine for jmoss.

    ``cuda``: include the CUDA details (toolkit, CUDA 13 problems and fix). None: only where a
    GPU is visible (or the CUDA 13 fix was built): on a CPU-only machine they are noise that
    reads like failures.
    """
    try:
        jittor_version = importlib.metadata.version("jittor")
    except importlib.metadata.PackageNotFoundError:
        jittor_version = "not installed (pip install jittor==1.3.11.0)"
    nvcc = find_nvcc()
    version = nvcc_version(nvcc) if nvcc else None
    gpus = cuda_device_count()
    fix_state = cuda_fix.state()
    if cuda is None:
        cuda = bool(gpus) or bool(fix_state["built"])
    device = "cuda" if gpus and cuda_toolkit_usable(version) else "cpu"
    lines = [
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("platform", platform.platform()),
        ("jittor", jittor_version),
        ("C++ compiler", _version(["g++", "--version"])),
        ("jmoss home", str(jmoss_home())),
        ("jittor cache", str(jittor_home())),
        ("downloads", "none: jmoss turns off what a plain `import jittor` fetches (oneDNN, cutt, cutlass, nccl, "
                      "a CUDA toolkit)"),
    ]
    if not cuda:
        toolkit = f"; CUDA toolkit {version[0]}.{version[1]} found, unused" if version else ""
        lines.append(("GPU", f"none visible: jmoss runs on the CPU (ok){toolkit}; `jmoss doctor --cuda` shows the "
                             "CUDA details"))
        lines.append(("device auto", device))
        return lines
    lines += [
        ("CUDA driver", f"{gpus} GPU(s) visible" if gpus else "no CUDA GPU visible (libcuda absent or no device)"),
        ("nvidia-smi", _version(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])),
        ("nvcc", f"{nvcc} (CUDA {version[0]}.{version[1]})" if nvcc and version else "not found"),
    ]
    for name, when, switch in JITTOR_DOWNLOADS:
        lines.append((f"download: {name}", f"plain jittor: {when}; jmoss sets {switch}, so never"))
    if version and version[0] >= 13:
        for problem in CUDA13_PROBLEMS:
            lines.append(("CUDA 13", problem))
    if (version and version[0] >= 13) or fix_state["built"]:
        lines.append(("CUDA 13 fix", cuda_fix_line(fix_state)))
        lines.extend(fix_item_lines(fix_state))
    if version and version[0] >= 13:
        has_npp = nvcc is not None and any(
            os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(nvcc)), d, "npp.h"))
            for d in ("include", os.path.join("targets", "x86_64-linux", "include")))
        lines.append(("NPP headers", "found" if has_npp else "missing: install the toolkit's NPP (pip install nvidia-npp)"))
    elif version:
        lines.append(("CUDA", f"CUDA {version[0]}.{version[1]} is supported by jittor 1.3.11"))
    lines.append(("device auto", device))
    return lines


def fix_item_lines(state: dict) -> list[tuple[str, str]]:
    """One line per CUDA 13 fix: applied in the copy on disk, left out of it, or not built yet."""
    applied, skipped = set(state.get("applied", ())), set(state.get("skipped", ()))
    lines = []
    for fix in cuda_fix.FIXES:
        where = "applied" if fix.number in applied else "LEFT OUT" if fix.number in skipped else "not applied"
        lines.append((f"CUDA 13 fix #{fix.number}", f"{where}: {fix.what} ({fix.path})"))
    return lines


def cuda_fix_line(state: dict | None = None) -> str:
    """The state of jmoss's CUDA 13 fix, and the command that changes it."""
    state = cuda_fix.state() if state is None else state
    if not state["built"]:
        return f"not built: run `jmoss doctor --fix-cuda` (writes a patched jittor copy to {state['path']})"
    if not state.get("complete"):
        why = state.get("problem") or f"skipped {state.get('skipped')}"
        return (f"incomplete copy in {state['path']} ({why}): jmoss will not import it; run `jmoss doctor --fix-cuda` "
                f"again without {cuda_fix.SKIP_ENV}")
    return (f"built in {state['path']} (fixes {', '.join(map(str, state['applied']))}; jmoss imports it for CUDA 13); "
            "undo: `jmoss doctor --undo-cuda-fix`")
