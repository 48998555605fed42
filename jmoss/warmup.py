"""Compile every kernel a model's forwards use at its first load, so no later forward waits for one.

Jittor compiles a kernel the first time a graph needs it and keeps it in its on-disk cache
(``jmoss.jittor_setup.jittor_home``). Which kernels a model needs depends on its shapes (the fused
decode layer's source carries each Linear's K and N), its dtypes and its ops, never on which layer
runs: the first layer and the head, run through a ``Session`` (the code path every forward takes)
once per path a forward can take, compile them all:

- a decode step and a prompt of up to ``FUSED_MAX_ROWS`` tokens: the fused decode layer;
- a longer prompt: the per-op layer (LayerNorm, the Linears with and without bias, rotary and
  the cache write, attention) and the last-position slice before the head;
- the head, for one row and for several.

Before this, a model's first short prompt, its first long prompt and its first decode step each
stopped to compile (on 2 cores, 17.5 s for the MOSS-16B int4 decode layer alone), whenever a user
first took that path. A marker under jittor's home, named by everything the kernels' sources and
keys depend on, records that the set was compiled, so later loads skip the warm-up (one stat); a
removed kernel cache takes its marker with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from jmoss.jittor_setup import jittor_home
from jmoss.model import MossModel
from jmoss.session import Session

try:
    from jmoss.kernels.cpu import FUSED_MAX_ROWS
except ImportError:  # an install without the compiled kernels: plain jittor has no fused path
    FUSED_MAX_ROWS = 16

_PACKAGE = Path(__file__).resolve().parent
# Sources whose text reaches a kernel's source or graph: a change to any of them means new kernels.
_KERNEL_SOURCES = ("model.py", "session.py", "kernels/cpu.py", "kernels/cpu_kernels.h", "kernels/cuda_quant.py")


class _FirstLayer:
    """The model seen as its first layer and its head: what a ``Session`` reads of a model."""

    def __init__(self, model: Any) -> None:
        self.config = dataclasses.replace(model.config, n_layer=1)
        self.jt, self.compute_dtype, self.rotary = model.jt, model.compute_dtype, model.rotary
        self.net = MossModel(model.jt, self.config, model.ops, model.compute_dtype)
        self.weights = model.weights
        self.embed = model.embed
        self.plan = None  # a 1-layer cache of a few positions: nothing the plan needs to bill


def kernel_set_key(model: Any) -> str:
    """A name for the kernels ``model``'s forwards compile: its config, device, dtypes and ops, the
    kernel sources, Jittor's version and the compiler command (both part of every kernel's key)."""
    jt = model.jt
    sources = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        try:
            sources.update((_PACKAGE / name).read_bytes())
        except OSError:
            sources.update(name.encode())
    what = {
        "config": model.config.to_dict(),
        "device": model.device,
        "dtype": model.dtype,
        "compute_dtype": model.compute_dtype,
        "ops": f"{type(model.ops).__module__}.{type(model.ops).__qualname__}",
        "isa": os.environ.get("JMOSS_KERNELS_ISA", ""),
        "sources": sources.hexdigest(),
        "jittor": getattr(jt, "__version__", ""),
        "compiler": [str(getattr(jt.flags, flag, "")) for flag in ("cc_path", "cc_flags", "python_path", "nvcc_path")],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def marker_path(model: Any) -> Path:
    return jittor_home() / "jmoss-kernel-sets" / kernel_set_key(model)


def warm_up(model: Any) -> bool:
    """Compile ``model``'s kernels unless a marker says this set was compiled; True if it ran.

    Costs one layer and the head, three times over (tens of milliseconds for MOSS-16B int4 once the
    kernels exist; their compile time the first time). A streaming engine is left where it was
    (its statistics reset); nothing of the warm-up stays in memory.
    """
    marker = marker_path(model)
    if marker.exists():
        return False
    first = _FirstLayer(model)
    positions = model.config.n_positions
    long = min(FUSED_MAX_ROWS + 1, positions)
    # the per-op layer, the last-position slice, the head on one row
    Session(first, batch=1, max_len=long).prefill([[0] * long])
    short = Session(first, batch=1, max_len=min(2, positions))
    short.prefill([[0]])  # the fused decode layer: decode steps and prompts of up to FUSED_MAX_ROWS tokens
    if positions > 1:
        short.decode([0])
        Session(first, batch=1, max_len=2).prefill([[0, 0]], last_only=False)  # the head on every row
    stats = getattr(model.weights, "stats", None)
    if stats is not None:
        stats.reset()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model": str(getattr(model, "path", "")), "config": model.config.to_dict()}))
        os.replace(tmp, marker)
    except OSError:  # a read-only jittor home: the kernels are compiled all the same
        pass
    return True
