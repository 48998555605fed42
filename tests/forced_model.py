"""Models whose next-token logits are forced by a rule over the tokens each position can see.

Speculative decoding must not change what a model generates; to test that, drafts have to be
accepted, partly accepted and rejected on purpose. A forced model makes the target's choice a
known rule of the visible history, so a test decides which drafts the target agrees with.

``ForcedModel`` has no weights. Its KV cache is jmoss's own KVCache, into which every forward
writes the token id of each slot it processes; each position's logits are the rule applied to the
ids its attention mask lets it see, read back from that cache. A rejected draft left in the
cache, a slot written at the wrong place or a wrong mask therefore changes what the model
produces, as it would for a real model, and ``visible_ids`` reads exactly what the cache holds.
It runs through the real Session and BatchRunner code (positions, masks, repacking).

``forced(model, rule)`` keeps a real model (weights streamed or resident, real KV values) and
adds a large bias on the rule's token: for tests under a streaming budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jmoss.config import MossConfig
from jmoss.jittor_setup import get_jittor
from jmoss.model import KVCache, rotary_tables
from jmoss.session import Session

Rule = Callable[[tuple[int, ...]], "int | np.ndarray"]  # visible ids -> forced token, or full logits
FORCE = 30.0  # the forced token's logit margin: far above any real or penalised logit


def rule_logits(rule: Rule, history: tuple[int, ...], vocab: int) -> np.ndarray:
    out = rule(history)
    if isinstance(out, np.ndarray):
        return out.astype(np.float32)
    logits = np.zeros(vocab, dtype=np.float32)
    logits[int(out)] = FORCE
    return logits


class Script:
    """Scripted continuations: after the latest trigger in the history the model writes that
    trigger's continuation while the history follows it; otherwise (off script, or past its end)
    a token derived from the last two ids (``babble``), so it never waits for a draft."""

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], babble: Sequence[int]):
        self.pairs = [(np.asarray(t, np.int32).tobytes(), list(c)) for t, c in pairs]
        self.babble = list(babble)

    def __call__(self, history: tuple[int, ...]) -> int:
        h = np.asarray(history, np.int32).tobytes()
        best, best_len, cont = -1, 0, None
        for trig, c in self.pairs:
            end = len(h)
            while True:
                at = h.rfind(trig, 0, end)
                if at < 0 or at % 4 == 0:
                    break
                end = at + len(trig) - 1
            # the latest trigger; at the same end the longer (more specific) one
            if at >= 0 and (at + len(trig), len(trig)) > (best, best_len):
                best, best_len, cont = at + len(trig), len(trig), c
        if cont is not None:
            done = list(history[best // 4 :])
            if done == cont[: len(done)] and len(done) < len(cont):
                return cont[len(done)]
        a = history[-1] if history else 0
        b = history[-2] if len(history) > 1 else 0
        return self.babble[(a * 31 + b * 7 + len(history)) % len(self.babble)]


class _NoWeights:
    def layer(self, i: int) -> dict:
        return {}

    def head(self) -> dict:
        return {}


class ForcedNet:
    """The ``net`` of a ForcedModel: writes ids into the cache, applies the rule per position."""

    def __init__(self, model: "ForcedModel"):
        self.model = model

    def new_cache(self, batch: int, max_len: int, dtype: str) -> KVCache:
        return KVCache(self.model.jt, self.model.config, batch, max_len, dtype)

    def forward(self, embeddings, layer_weights, head_weights, cache, step, last_only: bool = False,
                logits: bool = True, tail: int | None = None):
        m = self.model
        jt = m.jt
        for i in range(m.config.n_layer):
            layer_weights(i)
        head_weights()
        ids = np.rint(np.asarray(embeddings)[..., 0]).astype(np.int64)
        batch, width = ids.shape
        keys = cache.keys[0].numpy().copy()
        keys[:, 0, step.start : step.start + width, 0] = ids
        cache.keys[0] = jt.array(keys)
        m.passes.append((batch, width))
        visible = step.attn_bias.numpy()[:, 0] == 0  # [B, T, start+T]
        if not logits:
            return jt.array(np.asarray(embeddings, np.float32)[:, -1:, :])
        keep = tail or (1 if last_only else width)
        out = np.zeros((batch, keep, m.config.vocab_size), dtype=np.float32)
        total = step.start + width
        for b in range(batch):
            slots = keys[b, 0, :total, 0]
            for j, t in enumerate(range(width - keep, width)):
                history = tuple(int(x) for x in slots[visible[b, t]])
                out[b, j] = rule_logits(m.rule, history, m.config.vocab_size)
        return jt.array(out)


class ForcedModel:
    """A TextModel (``session``, ``tokenizer``, the ForwardModel attributes) run by a rule."""

    def __init__(self, rule: Rule, *, vocab_size: int = 107008, n_positions: int = 1024,
                 eos_token_id: int | None = 106068, tokenizer_path: Path | None = None):
        self.config = MossConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=8, n_layer=1, n_head=4,
                                 rotary_dim=2, eos_token_id=eos_token_id, bos_token_id=None)
        self.jt = get_jittor("cpu")
        self.compute_dtype = "float32"
        self.rotary = rotary_tables(self.config)
        self.net = ForcedNet(self)
        self.weights = _NoWeights()
        self.plan = None
        self.rule = rule
        self.passes: list[tuple[int, int]] = []  # (rows, width) of every forward
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from jmoss.errors import GenerationError
            from jmoss.tokenizer import load_tokenizer

            if self._tokenizer_path is None:
                raise GenerationError("this forced model has no tokenizer")

            self._tokenizer = load_tokenizer(self._tokenizer_path)
        return self._tokenizer

    def embed(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros(ids.shape + (self.config.n_embd,), dtype=np.float32)
        out[..., 0] = ids
        return out

    def session(self, batch: int = 1, max_len: int | None = None) -> Session:
        return Session(self, batch=batch, max_len=max_len)


def visible_ids(session: Session, row: int = 0) -> list[int]:
    """The token ids a ForcedModel session's cache holds for ``row``, in cache order (masked slots left out)."""
    keys = session.cache.keys[0].numpy()[row, 0, : session.length, 0]
    return [int(x) for x in keys[session.key_mask[row, : session.length] > 0]]


class _RealForcedNet:
    """A real model's net with the rule's token forced on top of its logits (ids kept on the side)."""

    def __init__(self, model, inner, rule: Rule):
        self.model, self.inner, self.rule = model, inner, rule
        self.slots: dict[int, np.ndarray] = {}

    def new_cache(self, batch: int, max_len: int, dtype: str):
        return self.inner.new_cache(batch, max_len, dtype)

    def forward(self, embeddings, layer_weights, head_weights, cache, step, last_only: bool = False,
                logits: bool = True, tail: int | None = None):
        ids = self.model._last_ids
        out = self.inner.forward(embeddings, layer_weights, head_weights, cache, step, last_only, logits, tail=tail)
        batch, width = ids.shape
        slots = self.slots.setdefault(id(cache), np.zeros((cache.batch, cache.max_len), dtype=np.int64))
        slots[:, step.start : step.start + width] = ids
        if not logits:
            return out
        visible = step.attn_bias.numpy()[:, 0] == 0
        real = out.numpy()
        keep = real.shape[1]
        for b in range(batch):
            for j, t in enumerate(range(width - keep, width)):
                history = tuple(int(x) for x in slots[b, : step.start + width][visible[b, t]])
                real[b, j, int(self.rule(history))] += 10 * FORCE
        return self.model.jt.array(real)


def forced(model, rule: Rule):
    """``model`` (a jmoss.api.Model) with ``rule``'s token forced on top of its real logits; the
    weights, streaming and KV cache stay the real model's."""
    net = _RealForcedNet(model, model.net, rule)
    embed = model.embed

    def remembering(ids: np.ndarray) -> np.ndarray:
        model._last_ids = np.asarray(ids)
        return embed(ids)

    model.embed = remembering
    model.net = net
    return model
