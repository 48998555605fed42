"""Every weight held as a jittor Var for the whole run: the source when no budget is given, or
the plan keeps every layer and the head on the device.

Loaded from a store (``ResidentWeights.from_store``), the weights exist once in memory: each group
is read with one ``preadv`` into a buffer this object owns (hashed, dropped from the page cache),
then wrapped as Vars without a copy (cpu; on cuda ``engine.cuda.CudaResidentWeights`` copies each
group from the file into device memory instead). Peak RSS is the weights plus one group, not the weights twice
(a memmap's pages plus jittor's copy of them). Nothing in jmoss writes a weight Var in place (the
model only reads them), so sharing the buffer with jittor is safe; the buffers are kept here for
as long as the Vars over them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jmoss import layout
from jmoss.engine.cpu import read_group, wrap_zero_copy
from jmoss.errors import DeviceError


class ResidentWeights:
    """Every layer's weights held as jittor Vars for the whole run (no budget, or it all fits)."""

    def __init__(self, jt, groups: Mapping[Any, Mapping[str, np.ndarray]], n_layer: int, dtype: str):
        def to_vars(tensors: Mapping[str, np.ndarray]) -> dict:
            out = {}
            for name, array in tensors.items():
                # no copy when already fp16/contiguous; packed codes and perms keep their integer dtype
                array = np.ascontiguousarray(array, dtype=dtype if array.dtype.kind == "f" else None)
                out[name] = jt.array(array)
            return out

        self._buffers: list[np.ndarray] = []  # owned host buffers the Vars share (cpu, from_store)
        self._nbytes = 0
        self._layers = [to_vars(groups[i]) for i in range(n_layer)]
        self._head = to_vars(groups[layout.HEAD])
        for tensors in self._layers + [self._head]:
            for var in tensors.values():
                var.sync()
                self._nbytes += int(var.nbytes)

    @classmethod
    def from_store(cls, jt, store, dtype: str) -> "ResidentWeights":
        """Every layer and the head of ``store`` on the CPU, each group read once into memory it
        keeps and shared with jittor (see the module docstring): no second copy."""
        if dtype not in ("float16", "float32"):
            raise DeviceError(f"resident weights are float16 or float32, not {dtype!r}")
        if dtype != "float16" and layout.packed_bits(store.config):
            raise DeviceError("a packed store's layers are used as stored: load it with dtype float16")
        if getattr(jt.flags, "use_cuda", 0):
            raise DeviceError("resident CUDA weights are read into device memory by jmoss.engine.cuda "
                              "(CudaResidentWeights, through jmoss.engine.factory.build_weights)")
        self = cls.__new__(cls)
        self._buffers, self._nbytes = [], 0
        itemsize = 2 if dtype == "float16" else 4

        def load(g) -> dict:
            buf, arrays = read_group(store, g, itemsize)
            self._buffers.append(buf)  # alive as long as the Vars that share it
            self._nbytes += buf.nbytes
            return {name: wrap_zero_copy(jt, a) for name, a in arrays.items()}

        self._layers = [load(i) for i in range(store.config.n_layer)]
        self._head = load(layout.HEAD)
        return self

    def layer(self, i: int) -> Mapping:
        return self._layers[i]

    def head(self) -> Mapping:
        return self._head

    def memory(self) -> dict[str, int]:
        """Bytes of weights held (the plan's resident_bytes when loaded under a plan)."""
        return {"resident_weights": self._nbytes}
