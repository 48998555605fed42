"""Every weight held as a jittor Var for the whole run: the source when no budget is given, or
the plan keeps every layer and the head on the device."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jmoss import layout


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

        self._layers = [to_vars(groups[i]) for i in range(n_layer)]
        self._head = to_vars(groups[layout.HEAD])
        for tensors in self._layers + [self._head]:
            for var in tensors.values():
                var.sync()

    def layer(self, i: int) -> Mapping:
        return self._layers[i]

    def head(self) -> Mapping:
        return self._head
