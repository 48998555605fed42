"""Jittor's own swap as a weight source: the baseline ``jmoss bench --compare jittor`` measures."""

from __future__ import annotations

from types import ModuleType
from typing import Mapping

import numpy as np

from jmoss.engine.pipeline import EngineStats
from jmoss.errors import DeviceError
from jmoss.layout import EMBED, HEAD, Group, all_groups


class JittorSwapWeights:
    """The baseline: every weight an ordinary jittor Var, under Jittor's own swap.

    Only valid in a process whose jittor was built with ``-DJT_SAVE_MEM=1``
    (``JMOSS_JITTOR_SAVE_MEM=1``, see jmoss.jittor_setup); ``jmoss bench --compare jittor``
    starts such a process. ``jt.flags.cpu_mem_limit`` is set to the budget *before* any weight is
    created, and each group is synced as it is created because ``jt.array`` allocates outside the
    limit and only later allocations evict (jittor-notes §2.2).
    """

    def __init__(self, store, jt: ModuleType, dtype: str, cpu_mem_limit: int) -> None:
        from jmoss.jittor_setup import save_mem_requested

        if not save_mem_requested():
            raise DeviceError(
                "swap='jittor' needs Jittor's swap build: start the process with JMOSS_JITTOR_SAVE_MEM=1 "
                "(`jmoss bench --compare jittor` does this for you)"
            )
        self.jt = jt
        self.stats = EngineStats()
        jt.flags.cpu_mem_limit = int(cpu_mem_limit)
        self._groups: dict[Group, dict] = {}
        for g in all_groups(store.config):
            if g == EMBED:
                continue
            self._groups[g] = {name: jt.array(np.array(a, dtype=dtype)) for name, a in store.group(g).items()}
            jt.sync_all()

    def layer(self, i: int) -> Mapping:
        return self._groups[i]

    def head(self) -> Mapping:
        self.stats.forwards += 1
        return self._groups[HEAD]

    def memory(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self._groups.clear()
