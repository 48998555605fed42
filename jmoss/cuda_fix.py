"""jmoss's own CUDA 13 fix for Jittor 1.3.11: a patched copy of Jittor under ``$JMOSS_HOME``.

Jittor 1.3.11 does not build against CUDA 13.0 (jittor-notes §1.6 and its 2026-12-01 update): six
errors, listed in ``FIXES``. Rather than editing site-packages, ``build()`` copies the installed
``jittor`` package into ``<jmoss home>/jittor-cuda13/jittor-<version>/jittor`` and applies the six
edits there; ``jmoss.jittor_setup`` puts that folder first on ``sys.path`` when it imports Jittor
for a CUDA >= 13 toolkit. Undo: ``jmoss doctor --undo-cuda-fix`` (or delete the folder).

Every edit names the exact text it replaces and must match the expected number of times, so a
Jittor that changed underneath fails here with a clear error instead of half-patching.
``JMOSS_CUDA_FIX_SKIP=1,3`` leaves the named fixes out (the CUDA build check uses it to prove that
each fix is needed); such a copy is recorded as incomplete and jmoss refuses to import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from jmoss.errors import JmossError

FIX_DIR_NAME = "jittor-cuda13"
MANIFEST = "jmoss-cuda-fix.json"
SKIP_ENV = "JMOSS_CUDA_FIX_SKIP"
SUPPORTED_JITTOR = ("1.3.11.0",)

_HELPERS = """// jmoss CUDA 13 fix: cudaDeviceProp lost computeMode and clockRate; ask the attribute API.
inline int jmoss_device_attribute(cudaDeviceAttr attr, int dev) {
  int value = 0;
  cudaDeviceGetAttribute(&value, attr, dev);
  return value;
}
// General GPU Device CUDA Initialization
inline int gpuDeviceInit(int devID) {"""

_STD_OLD = '        nvcc_flags = nvcc_flags.replace("-Wall", "")\n'
_STD_NEW = ('        if list(jit_utils.get_int_version(nvcc_path)) >= [13]:  # jmoss CUDA 13 fix: CCCL 3 needs C++17\n'
            '            nvcc_flags = nvcc_flags.replace("-std=c++14", "-std=c++17")\n' + _STD_OLD)


@dataclasses.dataclass(frozen=True)
class Fix:
    """One edit: in ``path`` (relative to the jittor package) replace ``old`` ``count`` times."""

    number: int
    path: str
    what: str
    edits: tuple[tuple[str, str, int], ...]


FIXES: tuple[Fix, ...] = (
    Fix(1, "extern/cuda/inc/helper_cuda.h", "cudaDeviceProp.computeMode -> cudaDevAttrComputeMode (3 places)", (
        ("// General GPU Device CUDA Initialization\ninline int gpuDeviceInit(int devID) {", _HELPERS, 1),
        ("deviceProp.computeMode == cudaComputeModeProhibited",
         "jmoss_device_attribute(cudaDevAttrComputeMode, devID) == cudaComputeModeProhibited", 1),
        ("deviceProp.computeMode != cudaComputeModeProhibited",
         "jmoss_device_attribute(cudaDevAttrComputeMode, current_device) != cudaComputeModeProhibited", 2),
    )),
    Fix(2, "extern/cuda/inc/helper_cuda.h", "cudaDeviceProp.clockRate -> cudaDevAttrClockRate", (
        ("deviceProp.clockRate", "jmoss_device_attribute(cudaDevAttrClockRate, current_device)", 1),
    )),
    Fix(3, "compiler.py", "nvcc gets -std=c++17 when nvcc >= 13 (CCCL 3 requires C++17)", (
        (_STD_OLD, _STD_NEW, 1),
    )),
    Fix(4, "other/code_softmax.py", "cub::Max() -> ::cuda::maximum<>()", (
        ("cub::Max()", "::cuda::maximum<>()", 1),
    )),
    Fix(5, "extern/cuda/cub/ops/cub_where_op.cc", "cub::CountingInputIterator -> thrust::counting_iterator", (
        ("#include <thrust/transform.h>\n",
         "#include <thrust/transform.h>\n#include <thrust/iterator/counting_iterator.h>\n", 1),
        ("cub::CountingInputIterator<To> counting_itr(0);", "thrust::counting_iterator<To> counting_itr(0);", 1),
    )),
    Fix(6, "extern/cuda/cub/ops/cub_where_op.cc", "cub::TransformInputIterator -> thrust::transform_iterator", (
        ("#include <thrust/transform.h>\n",
         "#include <thrust/transform.h>\n#include <thrust/iterator/transform_iterator.h>\n", 1),
        ("cub::TransformInputIterator<bool, NonZeroOp<Ti>, Ti*> itr(cond->ptr<Ti>(), NonZeroOp<Ti>());",
         "thrust::transform_iterator<NonZeroOp<Ti>, Ti*, bool> itr(cond->ptr<Ti>(), NonZeroOp<Ti>());", 1),
    )),
)


class CudaFixError(JmossError):
    """The CUDA 13 fix could not be built or is not usable."""


def installed_jittor() -> tuple[str, Path]:
    """(version, package directory) of the installed jittor, found without importing it."""
    try:
        version = importlib.metadata.version("jittor")
    except importlib.metadata.PackageNotFoundError:
        raise CudaFixError("jittor is not installed: pip install jittor==1.3.11.0") from None
    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.origin:
        raise CudaFixError("jittor is installed but cannot be found on sys.path; reinstall it")
    return version, Path(spec.origin).resolve().parent


def fix_root(home: Path | None = None) -> Path:
    """The folder all patched copies live in; deleting it undoes the fix."""
    if home is None:
        from jmoss.home import jmoss_home

        home = jmoss_home()
    return home / FIX_DIR_NAME


def fix_dir(version: str, home: Path | None = None) -> Path:
    """The folder to put first on sys.path: it holds ``jittor/`` and the manifest."""
    return fix_root(home) / f"jittor-{version}"


def skipped_fixes() -> set[int]:
    raw = os.environ.get(SKIP_ENV, "")
    try:
        return {int(x) for x in raw.replace(",", " ").split()}
    except ValueError:
        raise CudaFixError(f"{SKIP_ENV} must list fix numbers like '1,3', got {raw!r}") from None


def patch_text(fix: Fix, text: str) -> str:
    """``text`` with ``fix`` applied; raises when an anchor is not found exactly as expected."""
    for old, new, count in fix.edits:
        found = text.count(old)
        if found != count:
            raise CudaFixError(f"CUDA 13 fix #{fix.number} ({fix.path}): expected {count} occurrence(s) of "
                               f"{old.strip()[:60]!r}, found {found}; this jittor differs from 1.3.11.0")
        text = text.replace(old, new)
    return text


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build(home: Path | None = None, skip: set[int] | None = None) -> dict:
    """Copy the installed jittor and apply the fixes; return the manifest (also written to disk).

    Built in a temporary sibling folder and renamed into place, so an interrupted build never
    leaves a half-patched copy that jmoss would import.
    """
    version, source = installed_jittor()
    if version not in SUPPORTED_JITTOR:
        raise CudaFixError(f"the CUDA 13 fix is written for jittor {', '.join(SUPPORTED_JITTOR)}, "
                           f"installed is {version}: pip install jittor==1.3.11.0")
    skip = skipped_fixes() if skip is None else skip
    target = fix_dir(version, home)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        shutil.copytree(source, staging / "jittor", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        applied = []
        for fix in FIXES:
            if fix.number in skip:
                continue
            path = staging / "jittor" / fix.path
            path.write_text(patch_text(fix, path.read_text()))
            applied.append(fix.number)
        manifest = {
            "jittor_version": version,
            "source": str(source),
            "applied": applied,
            "skipped": sorted(skip),
            "complete": not skip,
            "files": {f.path: _digest(staging / "jittor" / f.path) for f in FIXES},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def undo(home: Path | None = None) -> bool:
    """Delete every patched copy; True if there was one."""
    root = fix_root(home)
    if not root.exists():
        return False
    shutil.rmtree(root)
    return True


def state(home: Path | None = None) -> dict:
    """What is on disk: {"built": bool, "complete": bool, "path": str, ...manifest}."""
    try:
        version, _ = installed_jittor()
    except CudaFixError as exc:
        return {"built": False, "complete": False, "path": str(fix_root(home)), "problem": str(exc)}
    target = fix_dir(version, home)
    manifest_path = target / MANIFEST
    if not manifest_path.exists():
        return {"built": False, "complete": False, "path": str(target)}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return {"built": True, "complete": False, "path": str(target), "problem": "unreadable manifest"}
    current = {"built": True, "path": str(target), **manifest}
    # A copy whose patched files changed since the build (hand edits, a partial copy) is not trusted.
    changed = [rel for rel, digest in manifest.get("files", {}).items()
               if not (target / "jittor" / rel).is_file() or _digest(target / "jittor" / rel) != digest]
    if changed:
        current.update(complete=False, problem=f"patched files changed since the build: {', '.join(changed)}")
    return current


def usable_dir(home: Path | None = None) -> Path:
    """The patched copy to import for CUDA 13, or a CudaFixError saying how to make one."""
    current = state(home)
    if not current["built"]:
        raise CudaFixError("this CUDA toolkit is 13.x, which jittor 1.3.11 cannot build against without jmoss's "
                           "CUDA 13 fix: run `jmoss doctor --fix-cuda` (about 1 s; undo with "
                           "`jmoss doctor --undo-cuda-fix`)")
    if not current.get("complete"):
        why = current.get("problem") or f"skipped fixes {current.get('skipped')}"
        raise CudaFixError(f"the CUDA 13 fix in {current['path']} is incomplete ({why}): run "
                           f"`jmoss doctor --fix-cuda` again without {SKIP_ENV}")
    return Path(current["path"])
