"""Every weight held as a jittor Var for the whole run: the source when no budget is given, or
the plan keeps every layer and the head on the device.

Loaded from a store (``ResidentWeights.from_store``) on the CPU in float16 (the kernels read the
stored bytes as they are), the weights are the store's own pages: every group file is mapped
read-only and checked (``Store.map_groups``: hashed on the mapped pages, several files at once),
and each tensor is wrapped as a Var over its mapped bytes without a copy. The page cache is then
the one copy of the weights: the process holds no anonymous memory for them, a second start (or a
second process on the same store) finds them in the cache and maps them in well under a second
per GB, and the mapping is ``PROT_READ``, so nothing can write into the file through it (a write
would fault; nothing in jmoss writes a weight Var in place). Each forward starts by checking that
no mapped file was written since it was checked (``Store.check_unchanged``: one fstat per file).

In float32 (a CPU without the fp16 kernels) the bytes must be widened, so each group is read once
into a buffer this object owns instead (``read_group``: hashed, widened in place, dropped from the
page cache) and the Vars share it: peak RSS is the weights plus one group, never twice them. On
cuda ``engine.cuda.CudaResidentWeights`` copies each group from the file into device memory.
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
        self._store = None  # the Store whose mapped pages the Vars are (from_store, float16)
        self._layers = [to_vars(groups[i]) for i in range(n_layer)]
        self._head = to_vars(groups[layout.HEAD])
        for tensors in self._layers + [self._head]:
            for var in tensors.values():
                var.sync()
                self._nbytes += int(var.nbytes)

    @classmethod
    def from_store(cls, jt, store, dtype: str) -> "ResidentWeights":
        """Every layer and the head of ``store`` on the CPU, never two copies (module docstring):
        float16 as the store's mapped pages, float32 read once into memory shared with jittor."""
        if dtype not in ("float16", "float32"):
            raise DeviceError(f"resident weights are float16 or float32, not {dtype!r}")
        if dtype != "float16" and layout.packed_bits(store.config):
            raise DeviceError("a packed store's layers are used as stored: load it with dtype float16")
        if getattr(jt.flags, "use_cuda", 0):
            raise DeviceError("resident CUDA weights are read into device memory by jmoss.engine.cuda "
                              "(CudaResidentWeights, through jmoss.engine.factory.build_weights)")
        self = cls.__new__(cls)
        self._buffers, self._nbytes, self._store = [], 0, None
        n_layer = store.config.n_layer
        if dtype == "float16":  # used as stored: the mapped pages themselves
            groups = store.map_groups([*range(n_layer), layout.HEAD])
            self._store = store  # each forward checks the mapped files are unchanged
            self._nbytes = sum(store.group_data_span(g)[1] for g in groups)
            self._layers = [{n: wrap_zero_copy(jt, a) for n, a in groups[i].items()} for i in range(n_layer)]
            self._head = {n: wrap_zero_copy(jt, a) for n, a in groups[layout.HEAD].items()}
            return self
        itemsize = 4

        def load(g) -> dict:
            buf, arrays = read_group(store, g, itemsize)
            self._buffers.append(buf)  # alive as long as the Vars that share it
            self._nbytes += buf.nbytes
            return {name: wrap_zero_copy(jt, a) for name, a in arrays.items()}

        self._layers = [load(i) for i in range(n_layer)]
        self._head = load(layout.HEAD)
        return self

    @property
    def mapped(self) -> bool:
        """Whether the weights are the store's mapped pages (page cache) rather than owned memory."""
        return getattr(self, "_store", None) is not None

    def layer(self, i: int) -> Mapping:
        if i == 0 and self.mapped:
            self._store.check_unchanged()  # a forward starts: its weights must still be the checked bytes
        return self._layers[i]

    def head(self) -> Mapping:
        return self._head

    def memory(self) -> dict[str, int]:
        """Bytes of weights held (the plan's resident_bytes when loaded under a plan); when
        ``mapped`` they are the store's pages in the page cache, not memory this process allocated."""
        return {"resident_weights": self._nbytes}
