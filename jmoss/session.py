"""Incremental inference over one batch of sequences: prefill, then decode token by token.

A Session owns a static KV cache sized once for (batch, max_len) and the bookkeeping that makes
left-padded batches exact: per-row position ids (a padded row's first real token is position 0,
as Hugging Face computes ``cumsum(mask) - 1``) and a key mask that hides pad slots. Generation,
chat and the server all drive a model through this one class.

The model's plan (jmoss.placement) is the source of every size here: the cache has the plan's KV
dtype and length, and a prompt is prefilled in chunks of ``plan.prefill_chunk`` tokens, one forward
each with the cache growing, because the plan's working buffers (attention scores, MLP
activations) are billed for a chunk, not for the whole prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from jmoss.errors import BudgetError, ContextLengthError, GenerationError
from jmoss.model import make_step
from jmoss.placement import DEFAULT_PREFILL_CHUNK
from jmoss.protocols import ForwardModel

if TYPE_CHECKING:
    from jmoss.tokenizer import Tokenizer


def planned_length(model: ForwardModel, batch: int, max_len: int | None) -> int:
    """The KV length of a cache for ``batch`` sequences: ``max_len``, or the plan's, checked.

    The budget paid for a KV cache of plan.batch x plan.max_seq_len; a bigger one would silently
    break the promise the plan made, so it is refused here, for sessions and batch runners alike.
    """
    n_positions = model.config.n_positions
    plan = getattr(model, "plan", None)
    if max_len is None:
        max_len = n_positions if plan is None else min(n_positions, plan.max_seq_len)
    if plan is not None and plan.device_memory is not None and batch * max_len > plan.batch * plan.max_seq_len:
        raise BudgetError(
            f"{batch} sequence(s) x {max_len} positions need more KV cache than this model's memory plan "
            f"({plan.batch} x {plan.max_seq_len}); load it with batch={batch} (serve --max-batch) or "
            f"max_seq_len={batch * max_len} (-c/--ctx-size {batch * max_len}), or shorten the input"
        )
    if not 0 < max_len <= n_positions:
        raise ContextLengthError(
            f"{max_len} positions requested but this model has n_positions={n_positions}; "
            "shorten the input (MOSS cannot attend past its trained context)"
        )
    return max_len


class Session:
    """KV cache + positions for ``batch`` sequences of at most ``max_len`` tokens each."""

    def __init__(self, model: ForwardModel, batch: int = 1, max_len: int | None = None):
        max_len = planned_length(model, batch, max_len)
        self.model, self.batch, self.max_len = model, batch, max_len
        plan = getattr(model, "plan", None)
        kv_dtype = model.compute_dtype if plan is None else plan.kv_dtype
        self.cache = model.net.new_cache(batch, max_len, kv_dtype)
        # tokens per prefill forward: what the plan's working buffers were sized for
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK if plan is None else plan.prefill_chunk
        self.key_mask = np.zeros((batch, max_len), dtype=np.int8)
        self.next_position = np.zeros(batch, dtype=np.int64)
        self.length = 0  # cache slots used (pads included)

    def reset(self) -> None:
        """Forget everything; the cache buffers are reused, not reallocated."""
        self.key_mask[:] = 0
        self.next_position[:] = 0
        self.length = 0

    def truncate(self, length: int) -> None:
        """Drop cached tokens past ``length`` slots (e.g. to rewind a turn); only for unpadded rows."""
        if not 0 <= length <= self.length:
            raise GenerationError(f"cannot truncate a session of {self.length} tokens to {length}")
        self.key_mask[:, length:] = 0
        self.next_position[:] = self.key_mask[:, :length].sum(axis=1)
        self.length = length

    @property
    def room(self) -> int:
        """Tokens that still fit before max_len."""
        return self.max_len - self.length

    def prefill(self, rows: Sequence[Sequence[int]] | np.ndarray, last_only: bool = True) -> np.ndarray:
        """Append tokens to every row and return logits (last position [B, V], or all [B, T, V]).

        Rows of different lengths are left-padded (only allowed on an empty session, as padding
        in the middle of a sequence would shift later positions). The tokens go through the model
        in chunks of ``prefill_chunk``; with ``last_only`` only the last chunk's last position
        reaches the vocabulary projection that is read back.
        """
        rows = [list(map(int, r)) for r in rows]
        if len(rows) != self.batch:
            raise GenerationError(f"session holds {self.batch} sequences, got {len(rows)} rows")
        width = max(len(r) for r in rows)
        if width == 0:
            raise GenerationError("prefill needs at least one token per row")
        if any(len(r) != width for r in rows) and self.length:
            raise GenerationError("rows of different lengths can only start a session (left padding)")
        ids = np.zeros((self.batch, width), dtype=np.int64)
        real = np.zeros((self.batch, width), dtype=np.int8)
        for b, r in enumerate(rows):
            if r:
                ids[b, width - len(r) :] = r
                real[b, width - len(r) :] = 1
        return self._forward(ids, real, last_only)

    def verify(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Append a few tokens per row in one forward and return every new position's logits [B, W, V].

        The pass of speculative decoding (jmoss.lookup): a fed token and its drafts, the weights
        read once for all of them. Rows shorter than the widest are right-padded (pad slots hidden
        by the key mask, so a finished row may send none); ``truncate`` then drops what was not
        kept. W must fit one prefill chunk, so the pass is one forward.
        """
        rows = [list(map(int, r)) for r in rows]
        if len(rows) != self.batch:
            raise GenerationError(f"session holds {self.batch} sequences, got {len(rows)} rows")
        width = max(len(r) for r in rows)
        if not 0 < width <= max(1, int(self.prefill_chunk)):
            raise GenerationError(f"a verify pass takes 1 to {self.prefill_chunk} tokens per row, got {width}")
        ids = np.zeros((self.batch, width), dtype=np.int64)
        real = np.zeros((self.batch, width), dtype=np.int8)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            real[b, : len(r)] = 1
        return self._forward(ids, real, last_only=False)

    def decode(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append one token per row; return next-token logits [B, V]."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(self.batch, 1)
        return self._forward(ids, np.ones_like(ids, dtype=np.int8), last_only=True)

    def _forward(self, ids: np.ndarray, real: np.ndarray, last_only: bool) -> np.ndarray:
        """Check, then run ``ids`` through the model in plan-sized chunks (all or nothing)."""
        model = self.model
        batch, width = ids.shape
        if self.length + width > self.max_len:
            raise ContextLengthError(
                f"{self.length} cached + {width} new tokens exceed this session's {self.max_len} positions "
                f"(the model has n_positions={model.config.n_positions}); shorten the prompt or start a new session"
            )
        vocab = model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise GenerationError(f"token ids must be in 0..{vocab - 1}")
        start, next_position = self.length, self.next_position.copy()
        chunk = max(1, int(self.prefill_chunk))
        parts = []
        try:
            for a in range(0, width, chunk):
                b = min(width, a + chunk)
                last = b == width
                wanted = last or not last_only  # a chunk before the last needs no logits, only its cache
                logits = self._chunk(ids[:, a:b], real[:, a:b], last_only, logits=wanted)
                if wanted:
                    parts.append(logits.numpy())
                else:
                    model.jt.sync_all()  # run this chunk (its keys/values) now: its activations go before the next
                    del logits
        except BaseException:
            self.key_mask[:, start:] = 0  # a failed prefill leaves the session as it was
            self.length, self.next_position = start, next_position
            raise
        if last_only:
            return parts[-1][:, -1, :]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def _chunk(self, ids: np.ndarray, real: np.ndarray, last_only: bool, logits: bool = True):
        """One forward of ``ids`` at the end of the cache; returns the (lazy) logits Var (with
        ``logits=False`` the last hidden state, the head skipped)."""
        model = self.model
        start, width = self.length, ids.shape[1]
        positions = self.next_position[:, None] + np.cumsum(real, axis=1) - 1
        positions = np.where(real > 0, positions, 0)  # pad slots: any valid row of the table
        self.key_mask[:, start : start + width] = real
        step = make_step(model.jt, model.config, model.rotary, start, positions, self.key_mask)
        embeddings = model.embed(ids)
        out = model.net.forward(embeddings, model.weights.layer, model.weights.head, self.cache, step, last_only,
                                logits)
        self.length += width
        self.next_position += real.sum(axis=1)
        return out


class TextModel(ForwardModel, Protocol):
    """What generation and chat read of a model: its tokenizer and fresh Sessions over it."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    def session(self, batch: int = 1, max_len: int | None = None) -> Session: ...
