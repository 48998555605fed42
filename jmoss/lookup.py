"""Prompt lookup: draft tokens taken from the context itself, for speculative decoding.

MOSS's replies often repeat what is already in the context (Results quoted back, code edited,
names and numbers restated). The drafter finds the most recent earlier occurrence of the last n
tokens (n from ``max_ngram`` down to ``min_ngram``, the longest match first) in the prompt and
the output so far and proposes the tokens that followed it, as llama.cpp's lookup decoding and
vLLM's n-gram speculator do. It needs no draft model: generation (jmoss.generation) verifies the
proposal in one forward pass of k+1 positions and keeps the longest prefix the target model
itself would have produced, so a pass over the weights can yield several tokens.

Only the accepted tokens are ever added to a drafter: it indexes the sequence as generated, never
a rejected draft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from jmoss.errors import GenerationError

if TYPE_CHECKING:
    from jmoss.protocols import ForwardModel

# Longest n-gram looked up; a longer match is tried first (it predicts better), down to one token.
# benchmarks/bench_lookup.py replays MOSS's recorded replies over these settings.
MAX_NGRAM = 3
MIN_NGRAM = 1
# Most draft tokens one pass verifies: a pass of k+1 rows must stay one fused decode op
# (kernels.FUSED_MAX_ROWS = 16) and close to a 1-row pass in cost.
MAX_DRAFT = 15
# "auto": drafts per pass, where a pass of a few rows costs about one row's: when reading the
# weights bounds it, which is so on CUDA and wherever layers are streamed each token (from the
# disk or over PCIe). Not, in general, for a model resident on the CPU: there the kernels are bound
# by compute (benchmarks/results/lookup-cpu-16b-int4.txt: on a 2-core AVX2 EPYC a pass of 2/4/8 rows
# of MOSS-16B int4 costs 1.8/4.0/6.1 one-row passes, so lookup with 3 of 4 drafts accepted decoded
# at 0.80x), and `--lookup K` turns it on where a measurement says it pays.
AUTO_DRAFT = 4
# The one resident CPU case that pays: an int4 model in the int8 compute mode on AVX-512 VNNI, where
# a pass of 2/4/5 rows costs 0.96/1.13/1.19 one-row passes (benchmarks/results/
# lookup-cpu-16b-int4-vnni-xeon.txt), so replaying MOSS's recorded replies at those costs predicts
# 1.23-1.51x for every conversation kind but text-to-image (1.06x) at 3 drafts, which is at least as
# good as 4 or more in every kind.
AUTO_DRAFT_CPU_VNNI = 3


@dataclass
class LookupStats:
    """What lookup did in one generation: verify passes, draft tokens fed and accepted, and the
    forward passes in all (verify and plain decode) after the prompt's."""

    passes: int = 0
    verify_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    per_pass: list[int] = field(default_factory=list)  # accepted drafts of each verify pass (all rows)


def parse_lookup(value: object) -> int | str:
    """``off``/0, ``auto``, or a draft length K (1..MAX_DRAFT): the ``lookup`` option, validated."""
    if isinstance(value, bool):
        raise GenerationError(f"lookup must be 'off', 'auto' or a number of draft tokens, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("off", "none", "0", "false", "no"):
            return 0
        if text == "auto":
            return "auto"
        try:
            value = int(text)
        except ValueError:
            raise GenerationError(f"lookup must be 'off', 'auto' or a number of draft tokens (1-{MAX_DRAFT}), "
                                  f"got {value!r}") from None
    if not isinstance(value, int) or not 0 <= value <= MAX_DRAFT:
        raise GenerationError(f"lookup must be 'off', 'auto' or a number of draft tokens (1-{MAX_DRAFT}), got {value!r}")
    return value


class PromptLookup:
    """An n-gram index over one growing sequence that proposes what followed its last n tokens before.

    For each n it maps every n-gram that ends at least one token before the end of the sequence to
    the position where it last ended, so a lookup finds the most recent earlier occurrence of the
    current suffix (never the suffix itself) in O(max_ngram).
    """

    def __init__(self, tokens: Sequence[int] = (), *, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise GenerationError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self._indexed = 0  # n-grams ending at positions < _indexed are in _ends
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens (the prompt, then each accepted token) to the sequence."""
        self.tokens.extend(int(t) for t in tokens)
        t = self.tokens
        last = len(t) - 1  # the newest position is left out: its n-grams are the suffix we look up
        for p in range(self._indexed, last):
            for n, ends in self._ends.items():
                if p + 1 >= n:
                    ends[tuple(t[p + 1 - n : p + 1])] = p
        self._indexed = max(self._indexed, last)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        t = self.tokens
        if k < 1 or not t:
            return []
        for n in range(min(self.max_ngram, len(t)), self.min_ngram - 1, -1):
            end = self._ends[n].get(tuple(t[len(t) - n :]))
            if end is not None:
                return t[end + 1 : end + 1 + k]
        return []


def auto_drafts(model: "ForwardModel") -> int:
    """Drafts per pass under "auto": AUTO_DRAFT where a pass is bound by reading weights (CUDA, or
    a plan that streams layers every token), AUTO_DRAFT_CPU_VNNI for a resident int4 model whose
    packed passes run the int8 compute mode's VNNI tiles, else 0.

    It depends on the model, its plan and the kernels' mode and build only, never on timings, so a
    seeded sampled generation gives the same text on every run."""
    plan = getattr(model, "plan", None)
    if plan is None:
        return 0
    if plan.device == "cuda" or plan.streams:
        return AUTO_DRAFT
    return AUTO_DRAFT_CPU_VNNI if _cpu_passes_cost_about_one_row(model) else 0


def _cpu_passes_cost_about_one_row(model: "ForwardModel") -> bool:
    """A CPU model with int4 weights in groups the int8 decode kernels take (multiples of 32), the
    kernels in the int8 compute mode, and their 4-row tiles built for AVX-512 VNNI."""
    config = getattr(model, "config", None)
    if model.plan.device != "cpu" or config is None or getattr(config, "wbits", 32) != 4:
        return False
    group = getattr(config, "groupsize", 0) or 0
    if group <= 0 or group % 32:
        return False
    from jmoss import kernels

    return kernels.quant_compute() == "int8" and kernels.q8_vnni_ready()


def draft_limit(lookup: int | str, model: "ForwardModel", session: object) -> int:
    """Draft tokens a pass may verify for this model and session: 0 when lookup is off or cannot run.

    A verify pass must be one forward (at most one prefill chunk of the session), and its working
    memory, logits for every fed position included, must fit what the memory plan billed for a
    prefill chunk (jmoss.placement.work_buffer_bytes), so the plan stays the budget.
    """
    lookup = parse_lookup(lookup)
    if not lookup or not hasattr(session, "verify"):
        return 0
    k = auto_drafts(model) if lookup == "auto" else int(lookup)
    chunk = getattr(session, "prefill_chunk", None)
    if chunk:
        k = min(k, int(chunk) - 1)
    plan = getattr(model, "plan", None)
    if plan is not None and k > 0:
        from jmoss.placement import work_buffer_bytes

        def bill(drafts: int) -> int:
            work = work_buffer_bytes(model.config, device=plan.device, max_seq_len=plan.max_seq_len, batch=plan.batch,
                                     prefill_chunk=drafts + 1)
            return sum(work.values()) + 2 * plan.batch * drafts * model.config.vocab_size * 4  # logits of the drafts

        while k > 0 and bill(k) > plan.work_bytes:
            k -= 1
    return max(0, k)
