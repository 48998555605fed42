"""The host-side token table: one embedding row per token, dequantized only for the rows read.

A packed store keeps ``wte`` as int8 rows with per-group scales (``jmoss.layout``); looking up a
token dequantizes its row alone, so the table never exists in float in memory.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jmoss.config import MossConfig
from jmoss.layout import embed_bits, unpack_codes

class EmbeddingTable:
    """The host-side token table: ``rows(ids)`` gives float32 rows, dequantizing only those rows.

    ``tensors`` is the embed group (memory-mapped): ``wte.weight`` fp16, or a packed ``wte``.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], config: MossConfig) -> None:
        self.weight = tensors.get("wte.weight")
        self.group_size = config.groupsize
        if self.weight is None:
            self.bits = embed_bits(config)
            self.perm = np.asarray(tensors["wte.perm"])
            self.qweight, self.scales, self.zeros = tensors["wte.qweight"], tensors["wte.scales"], tensors["wte.zeros"]
            self.inverse = np.argsort(self.perm)

    @property
    def packed(self) -> bool:
        return self.weight is None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), n_embd] for flat token ids."""
        ids = np.asarray(ids).reshape(-1)
        if self.weight is not None:
            return np.asarray(self.weight[ids], dtype=np.float32)
        k_in = int(self.perm.shape[0])
        codes = unpack_codes(np.asarray(self.qweight[ids]), self.bits, k_in).astype(np.float32)
        g = np.arange(k_in) // self.group_size
        w = (codes - np.asarray(self.zeros[ids], np.float32)[:, g]) * np.asarray(self.scales[ids], np.float32)[:, g]
        return w[:, self.inverse]  # position j holds input feature perm[j]

