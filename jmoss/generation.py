"""Token generation: MOSS's sampling order, stop sequences, time limits and streaming text.

Sampling follows MOSS (moss-spec §5.2): repetition penalty over every id in the sequence so far
(prompt included; each distinct id once: negative logits multiplied, positive divided) ->
OpenAI's presence/frequency penalties (over the generated ids only) -> [token mask] -> temperature
-> top-k -> top-p -> softmax -> sample. Greedy decoding applies the penalties too, as Hugging Face's
generate does. Ids at or past the tokenizer's size (the embedding has padding rows) are never
produced. With ``logprobs`` set, each step also reports the chosen token's log-probability and the
``logprobs`` most likely tokens, from the model's own distribution (before any penalty or mask).

The token mask is the one hook for constrained output (``GenerationOptions.constraint``, e.g. a
JSON schema, jmoss.constraints): each generated row gets its own :class:`TokenMask`, asked which
ids may come next before every sampling step and told which one came. It sits after the
penalties and before temperature, so greedy, top-k and top-p only ever choose among allowed ids.

Prompt-lookup decoding (``GenerationOptions.lookup``, jmoss.lookup) verifies draft tokens with the
same processing, position by position, so it changes how many forward passes a reply takes, not
what greedy decoding writes, nor the distribution sampling draws from; a mask only sees kept tokens.

Text streaming never splits a UTF-8 character (the tokenizer's stream decoder holds back
incomplete bytes) and never shows the beginning of a string stop sequence that may still match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from jmoss.errors import ContextLengthError, GenerationError, TokenizerError
from jmoss.lookup import LookupStats, PromptLookup, draft_limit, parse_lookup

if TYPE_CHECKING:
    from jmoss.session import Session, TextModel


@dataclass(frozen=True)
class GenerationOptions:
    """Options under the names Hugging Face users know; defaults are MOSS's."""

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.02
    stop: tuple = ()  # strings and/or token ids (or id sequences); the model's eos is always a stop
    max_time: float | None = None
    seed: int | None = None
    skip_special_tokens: bool = True
    # OpenAI's: subtracted from a token's logit once it was generated (presence), and per time (frequency)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; N: the chosen token's logprob and the N most likely (0-20)
    constraint: "Constraint | None" = None  # e.g. a JSON schema (jmoss.constraints); one TokenMask per row
    # prompt-lookup speculative decoding (jmoss.lookup): "off"/0, "auto" (on where it pays), or at most K draft tokens per pass
    lookup: int | str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise GenerationError(f"temperature must be > 0 when sampling, got {self.temperature!r} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.max_time is not None and not self.max_time > 0:
            raise GenerationError(f"max_time must be a positive number of seconds, got {self.max_time!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise GenerationError(f"{name} must be a number in [-2, 2] (OpenAI's range), got {value!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise GenerationError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        if self.constraint is not None and not callable(getattr(self.constraint, "start", None)):
            raise GenerationError("constraint must have a start() that returns a TokenMask (see jmoss.constraints)")
        object.__setattr__(self, "lookup", parse_lookup(self.lookup))

    @classmethod
    def from_kwargs(cls, **options) -> "GenerationOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenerationError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        stop = options.get("stop")
        if stop is None:
            options["stop"] = ()
        elif isinstance(stop, (str, int)):
            options["stop"] = (stop,)
        else:
            options["stop"] = tuple(tuple(s) if isinstance(s, list) else s for s in stop)
        return cls(**options)


class TokenMask(Protocol):
    """One row's constraint on its next token: the sampler's hook (a grammar matcher, usually).

    ``mask()``: which ids may come next, a bool array over at least the sampled vocabulary (None:
    any). ``advance(token)``: the id that was chosen. ``rollback(n)``: take back the last ``n``
    advanced ids, for a caller that verified a draft and rejected its tail. ``done``: nothing but
    the end of the sequence may follow.
    """

    done: bool

    def mask(self) -> np.ndarray | None: ...

    def advance(self, token: int) -> None: ...

    def rollback(self, n: int) -> None: ...


class Constraint(Protocol):
    """What ``GenerationOptions.constraint`` holds: a compiled rule that starts one TokenMask per row."""

    def start(self) -> TokenMask: ...


class Sampler:
    """Turns next-token logits into token ids, one position at a time, in MOSS's order.

    ``scores`` processes one position's logits given the ids before it (``history``: the prompt,
    earlier turns and every token generated up to that position; ``generated``: the tail of it
    this generation produced) and its row's TokenMask; ``pick`` draws a token from them and
    ``verify`` decides a speculative draft token (jmoss.lookup) at one position. Lookup verifies a
    draft position by position, each with exactly the history, generated ids and mask state plain
    generation would have had there (accepted drafts included), so the repetition penalty, the
    presence/frequency penalties and the mask stay exact. A TokenMask advances on each token
    ``pick``/``verify`` return that generation keeps and on nothing else: verification never
    processes a position after the first rejected draft (see generation.generate_ids), so a
    rejected draft never reaches a mask and nothing needs rolling back.

    ``last`` holds, after each call with ``options.logprobs`` set, one ``(logprob, top)`` per row:
    the chosen id's log-probability and ``[(id, logprob), ...]`` of the most likely ids
    (:meth:`logprob` gives the same for one position, e.g. an accepted draft).
    """

    def __init__(self, options: GenerationOptions, vocab_limit: int):
        self.options = options
        self.vocab_limit = vocab_limit
        self.rng = np.random.default_rng(options.seed)
        self.last: list[tuple[float, list[tuple[int, float]]] | None] = []

    def __call__(self, logits: np.ndarray, histories: Sequence[Sequence[int]],
                 generated: Sequence[Sequence[int]] | None = None,
                 masks: Sequence[TokenMask | None] | None = None) -> np.ndarray:
        generated = generated if generated is not None else [()] * len(histories)
        masks = masks if masks is not None else [None] * len(histories)
        picked = [self.pick(row, history, new, mask)
                  for row, history, new, mask in zip(logits, histories, generated, masks)]
        if self.options.logprobs is not None:
            self.last = [self.logprob(row, token) for row, token in zip(logits, picked)]
        return np.array(picked, dtype=np.int64)

    def logprob(self, logits: np.ndarray, token: int) -> tuple[float, list[tuple[int, float]]] | None:
        """``token``'s log-probability under the model's own logits and the ``options.logprobs``
        most likely ids (None when logprobs are off)."""
        if self.options.logprobs is None:
            return None
        return _logprobs(logits[: self.vocab_limit], token, self.options.logprobs)

    def _processed(self, logits: np.ndarray, history: Sequence[int], generated: Sequence[int],
                   mask: TokenMask | None) -> np.ndarray:
        """Penalties, then the mask; sampling: then temperature and top-k (top-p is left to the caller)."""
        o = self.options
        scores = np.array(logits[: self.vocab_limit], dtype=np.float32)
        if o.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[seen < self.vocab_limit]
            values = scores[seen]
            scores[seen] = np.where(values < 0, values * o.repetition_penalty, values / o.repetition_penalty)
        if (o.presence_penalty or o.frequency_penalty) and len(generated):
            # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c over the output
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            keep = ids < self.vocab_limit
            ids, counts = ids[keep], counts[keep]
            scores[ids] -= (counts * o.frequency_penalty + o.presence_penalty).astype(np.float32)
        if mask is not None:
            scores = _masked(scores, mask.mask())
        if not o.do_sample:
            return scores
        scores = scores / o.temperature
        if o.top_k and o.top_k < scores.size:
            kth = np.partition(scores, -o.top_k)[-o.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        return scores

    def _distribution(self, logits: np.ndarray, history: Sequence[int], generated: Sequence[int],
                      mask: TokenMask | None) -> tuple[np.ndarray | None, np.ndarray]:
        """Sampling's candidates and their probabilities: (kept ids ascending, probs) under top-p,
        else (None, probs over every id)."""
        scores = self._processed(logits, history, generated, mask)
        if self.options.top_p < 1.0:
            kept, weights = _top_p_kept(scores, self.options.top_p)
            return kept, weights / weights.sum()
        return None, _softmax(scores)

    def scores(self, logits: np.ndarray, history: Sequence[int], generated: Sequence[int] = (),
               mask: TokenMask | None = None) -> np.ndarray:
        """One position's logits processed in order: repetition penalty, presence/frequency
        penalties over ``generated``, the mask, then (sampling only) temperature, top-k and top-p;
        excluded ids are -inf."""
        scores = self._processed(logits, history, generated, mask)
        if self.options.do_sample and self.options.top_p < 1.0:
            kept, _ = _top_p_kept(scores, self.options.top_p)
            out = np.full_like(scores, -np.inf)
            out[kept] = scores[kept]
            return out
        return scores

    def pick(self, logits: np.ndarray, history: Sequence[int], generated: Sequence[int] = (),
             mask: TokenMask | None = None) -> int:
        """One position's next id from its logits, ``history`` (every id before it, prompt included),
        ``generated`` (the ids this generation produced so far, the tail of ``history``) and its
        row's TokenMask (if any): the best one (greedy) or one drawn from the processed distribution."""
        if not self.options.do_sample:
            return int(self._processed(logits, history, generated, mask).argmax())
        ids, probs = self._distribution(logits, history, generated, mask)
        choice = int(self.rng.choice(probs.size, p=probs))
        return int(ids[choice]) if ids is not None else choice

    def verify(self, logits: np.ndarray, history: Sequence[int], draft: int, generated: Sequence[int] = (),
               mask: TokenMask | None = None) -> int:
        """The token this position gets when a drafter proposed ``draft``: ``draft`` itself when accepted.

        Greedy: the best token (accepted iff it is the draft), so output equals plain greedy.
        Sampling, the standard speculative acceptance for a deterministic drafter (whose proposal
        distribution is a point mass on the draft): accept with probability p(draft), else draw
        from p with the draft removed and renormalised. Then P(token = x) = p(x) for every x: for
        the draft p(draft); for x != draft (1 - p(draft)) * p(x) / (1 - p(draft)). A draft the
        mask forbids, or outside top-k/top-p, has p = 0: always rejected.
        """
        if not self.options.do_sample:
            return int(self._processed(logits, history, generated, mask).argmax())
        ids, probs = self._distribution(logits, history, generated, mask)
        if ids is None:
            at = int(draft) if 0 <= draft < probs.size else -1
        else:
            at = int(np.searchsorted(ids, draft))
            at = at if at < ids.size and ids[at] == draft else -1
        p = float(probs[at]) if at >= 0 else 0.0
        if self.rng.random() < p:
            return int(draft)
        if p > 0.0:
            probs = probs.copy()
            probs[at] = 0.0
            probs /= probs.sum()
        choice = int(self.rng.choice(probs.size, p=probs))
        return int(ids[choice]) if ids is not None else choice


def _masked(scores: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """``scores`` with every id the mask forbids at -inf (ids past the mask's length are forbidden)."""
    if allowed is None:
        return scores
    n = min(scores.size, allowed.size)
    if not allowed[:n].any():
        raise GenerationError("the output constraint allows no token here (a grammar that cannot continue)")
    if n == scores.size:
        return np.where(allowed[:n], scores, np.float32(-np.inf))
    out = np.full_like(scores, -np.inf)
    out[:n] = np.where(allowed[:n], scores[:n], np.float32(-np.inf))
    return out


def _logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log_softmax of the model's logits at ``token``, and the ``top`` most likely ids (best first)."""
    x = np.asarray(logits, dtype=np.float64)
    logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    best = np.argpartition(-logp, top)[:top] if 0 < top < logp.size else np.arange(logp.size if top else 0)
    best = best[np.argsort(-logp[best], kind="stable")]
    return float(logp[token]), [(int(i), float(logp[i])) for i in best]


# Score bins of _top_p_kept: only the bin where the nucleus ends is sorted, ~vocab / TOP_P_BINS
# tokens where scores spread evenly, a few where they are peaked.
TOP_P_BINS = 4096


def _top_p_kept(scores: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The tokens Hugging Face's top-p warper keeps, ascending, and their unnormalised weights.

    Kept: the most likely tokens while the probability of all tokens ranked above them is below
    ``top_p`` (the top one always). That is the set a sort of the whole vocabulary gives (what the
    warper does); a 107,008-entry sort per token costs as much as a small model's forward, so
    nothing large is sorted here: the scores go into TOP_P_BINS bins by value, every bin before
    the one where the mass reaches ``top_p`` is kept whole, every bin after it is dropped, and only
    that boundary bin is sorted. Linear time whatever the nucleus: 107,008 logits, 2-3 ms a token
    where a first 64-candidate partition, then the whole vocabulary, took 4-25 ms.
    """
    s = scores.astype(np.float64)
    top_score = float(s.max())
    weights = np.exp(s - top_score)
    target = top_p * float(weights.sum())
    # bin 0 holds the best scores; weights that underflowed to 0 (and -inf) go to the extra last
    # bin, never kept: the mass above them is all of it
    alive = weights > 0
    span = top_score - float(np.min(s, where=alive, initial=top_score))
    scale = np.float32((TOP_P_BINS - 1) / span if span > 0 else 0.0)
    bins = np.minimum((np.float32(top_score) - scores) * scale, np.float32(TOP_P_BINS - 1)).astype(np.int32)
    bins[~alive] = TOP_P_BINS
    mass = np.cumsum(np.bincount(bins, weights=weights, minlength=TOP_P_BINS + 1))
    edge = min(int(np.searchsorted(mass, target, side="left")), TOP_P_BINS - 1)
    before = float(mass[edge - 1]) if edge else 0.0  # < target: every token of earlier bins is kept
    members = np.flatnonzero(bins == edge)
    members = members[np.argsort(weights[members])[::-1]]
    inside = np.cumsum(weights[members])
    keep = bins < edge
    keep[members[before + inside - weights[members] < target]] = True  # the best one always: above it, `before`
    kept = np.flatnonzero(keep)
    return kept, weights[kept]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@dataclass
class _Stops:
    """Stop conditions split into token sequences (checked on ids) and strings (checked on text)."""

    token_seqs: list[tuple[int, ...]] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, model: "TextModel", stop: tuple) -> "_Stops":
        stops = cls()
        eos = model.config.eos_token_id
        if eos is not None:
            stops.token_seqs.append((int(eos),))
        for s in stop:
            if isinstance(s, (int, np.integer)):
                stops.token_seqs.append((int(s),))
            elif isinstance(s, tuple):
                stops.token_seqs.append(tuple(int(t) for t in s))
            elif isinstance(s, str):
                special = model.tokenizer.token_to_id(s) if s else None
                if special is not None and special in model.tokenizer.special_ids:
                    stops.token_seqs.append((special,))  # e.g. "<eom>", "<eoc>": one token each
                elif s:
                    stops.strings.append(s)
            else:
                raise GenerationError(f"a stop must be a string, a token id or a list of ids, got {s!r}")
        return stops

    def token_hit(self, generated: Sequence[int]) -> int:
        """Length of the stop sequence that ``generated`` ends with (0 if none)."""
        for seq in self.token_seqs:
            if len(generated) >= len(seq) and tuple(generated[-len(seq):]) == seq:
                return len(seq)
        return 0

    def text_cut(self, text: str) -> int | None:
        """Index where the earliest string stop starts in ``text``, or None."""
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else None

    def held_back(self, text: str) -> int:
        """How many trailing characters could still grow into a string stop."""
        keep = 0
        for s in self.strings:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return keep


def _as_rows(model: "TextModel", prompt) -> tuple[list[list[int]], bool]:
    """Normalise a prompt (text, ids, or a list of either) to id rows; second value: was batched."""
    if isinstance(prompt, str):
        return [model.tokenizer.encode(prompt)], False
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
        return [[int(t) for t in prompt]], False
    if isinstance(prompt, (list, tuple)) and prompt:
        rows = [_as_rows(model, p)[0][0] for p in prompt]
        return rows, True
    raise GenerationError("prompt must be text, a list of token ids, or a non-empty list of those")


StopCheck = Callable[[], bool]  # a cancel callback: True ends generation before the next step


def fit_to_context(max_new_tokens: int, used: int, max_len: int) -> int:
    """How many new tokens fit after ``used`` of ``max_len`` positions: the one clamp of max_tokens."""
    if used >= max_len:
        raise ContextLengthError(
            f"{used} tokens leave no room for a reply in {max_len} positions; shorten the input or start anew"
        )
    return min(max_new_tokens, max_len - used)


def generate_ids(
    model: "TextModel",
    session: "Session",
    rows: list[list[int]],
    options: GenerationOptions,
    *,
    histories: list[list[int]] | None = None,
    should_stop: StopCheck | None = None,
    fit_context: bool = False,
    reasons: list[str | None] | None = None,
    stats: LookupStats | None = None,
    logprobs_out: list | None = None,
) -> Iterator[list[int | None]]:
    """Prefill ``rows`` into ``session`` and yield, per step, each row's new token (None: none this step).

    A row ends on a stop token sequence (the stop tokens are yielded, so callers see why), at
    max_new_tokens, at max_time, when the session is full, or when ``should_stop()`` turns true
    (checked before the prefill and before every forward pass: at most one more pass runs). With
    ``fit_context`` max_new_tokens is clamped to the room the session has after the prefill
    (:func:`fit_to_context`) and a row ending there ends for "context". ``reasons`` (one entry per
    row) receives why each row ended: "stop", "length", "context", "time" or "cancelled".
    ``histories`` are the ids the repetition penalty sees before the new rows (a chat's earlier turns).
    With ``options.constraint`` each row gets its own TokenMask, advanced by every id it takes
    (and by no other: see below). The model's ``stats`` (jmoss.stats), when it has one, records
    tokens and latencies. ``logprobs_out`` (with ``options.logprobs`` set) is refilled at each step
    with each row's ``(logprob, top)`` (see :class:`Sampler`).

    With ``options.lookup`` (jmoss.lookup) a pass may yield several steps: each live row's next
    token is fed together with up to k draft tokens taken from its own context, one forward
    returns the logits of every fed position, and each draft is verified in order with
    :meth:`Sampler.verify` (each position sees the history, generated ids and mask state plain
    decoding would have had). The accepted drafts are yielded as the following steps; the first
    rejection (or the token after the last draft) is the next token fed, and the cache is truncated
    past what was kept. Verification stops at the first rejected draft (and where a row's mask is
    done), so a TokenMask only ever advances on kept tokens, and every emitted token, an accepted
    draft included, has its logprobs from its own position's logits. Greedy output is plain
    greedy's, token for token; sampled output follows the target distribution. Rows of a batched
    Session keep the same number of tokens per pass (up to the first position any live row
    rejects: the cache stays one column per token); a BatchRunner slot is one row and keeps all it
    accepted. Whenever the generator stops (finished, closed or failed) a one-row session holds
    exactly what plain decoding would hold: the prompt and every generated token but the last.
    ``stats`` receives the passes run and the drafts fed and accepted.
    """
    stops = _Stops.build(model, options.stop)
    sampler = Sampler(options, vocab_limit=_vocab_limit(model))
    seen = [list(h) + list(r) for h, r in zip(histories or [[] for _ in rows], rows)]
    generated: list[list[int]] = [[] for _ in rows]
    masks = [options.constraint.start() for _ in rows] if options.constraint is not None else None
    why: list[str | None] = reasons if reasons is not None else []
    why[:] = [None] * len(rows)
    limit = options.max_new_tokens
    if fit_context:
        limit = fit_to_context(limit, session.length + max(len(r) for r in rows), session.max_len)

    def end(reason: str) -> None:
        for b, r in enumerate(why):
            if r is None:
                why[b] = reason

    deadline = time.monotonic() + options.max_time if options.max_time else None
    if should_stop is not None and should_stop():
        end("cancelled")
        return
    stats = stats if stats is not None else LookupStats()
    k = draft_limit(options.lookup, model, session)
    drafters = [PromptLookup(s) for s in seen] if k else []
    meter: Any = getattr(model, "stats", None)
    run = meter.begin(len(rows), sum(map(len, rows)), session.length, masks is not None) if meter is not None else None
    base: int | None = None  # plain decoding feeds generated token n into slot base + n - 1
    last = limit
    ahead = [0] * len(rows)  # tokens a row's mask advanced on that are not emitted yet (a verify pass's)

    def choose(logits: np.ndarray) -> "_Chosen":
        """Each row's next token from one position's logits (plain decoding); live rows' masks take it."""
        tokens = [int(t) for t in sampler(logits, seen, generated, masks)]
        if masks is not None:
            for b, token in enumerate(tokens):
                if why[b] is None:
                    masks[b].advance(token)
                    ahead[b] += 1
        return _Chosen(tokens, list(sampler.last) if options.logprobs is not None else None,
                       [m.done for m in masks] if masks is not None else None)

    def emit(chosen: "_Chosen") -> list[int | None]:
        """Record one step's tokens; a row that ends here gets its reason (stop before length)."""
        step: list[int | None] = list(chosen.tokens)
        for b, token in enumerate(step):
            if token is None or why[b] is not None:
                step[b] = None
                continue
            generated[b].append(token)
            seen[b].append(token)
            if drafters:
                drafters[b].extend((token,))
            n = len(generated[b])
            # a completed constraint (the JSON closed) ends the row: no eos step
            why[b] = ("stop" if stops.token_hit(generated[b]) or (chosen.done is not None and chosen.done[b])
                      else "length" if n == options.max_new_tokens else "context" if n >= last else None)
            if masks is not None:
                ahead[b] -= 1
                if why[b] is not None and ahead[b] > 0:  # it ended inside a verify pass's tokens: the
                    masks[b].rollback(ahead[b])  # mask takes back those it will never emit
                    ahead[b] = 0
        if logprobs_out is not None and chosen.logprobs is not None:
            logprobs_out[:] = chosen.logprobs
        if run is not None:
            run.step(sum(t is not None for t in step))
        return step

    try:
        logits = session.prefill(rows)
        base = session.length
        last = min(limit, session.max_len - base + 1)  # the token a row ends at for length or context
        pending = choose(logits)
        while True:
            yield emit(pending)  # each live row's next token: what plain decoding feeds next
            if all(r is not None for r in why):
                return  # no forward for a token nobody will read
            reason = ("time" if deadline is not None and time.monotonic() >= deadline
                      else "cancelled" if should_stop is not None and should_stop() else None)
            if reason is not None:
                end(reason)
                return
            live = [b for b in range(len(rows)) if why[b] is None]
            drafts = [drafters[b].propose(min(k, last - len(generated[b]), session.room - 1))
                      if drafters and b in live else [] for b in range(len(rows))]
            if not all(drafts[b] for b in live):  # a row without a draft would keep 1 token: plain decode
                feed = [t if why[b] is None and t is not None else (model.config.eos_token_id or 0)
                        for b, t in enumerate(pending.tokens)]
                logits = session.decode(feed)
                stats.passes += 1
                pending = choose(logits)
                continue
            start = session.length
            out = session.verify([[pending.tokens[b]] + drafts[b] if why[b] is None else [] for b in range(len(rows))])
            runs = _verify(sampler, out, seen, generated, masks, drafts, live)
            keep = len(runs[live[0]])  # tokens each live row keeps from this pass: its fed token + accepted drafts
            if masks is not None:
                for b in live:
                    ahead[b] += keep
            stats.passes += 1
            stats.verify_passes += 1
            stats.drafted += sum(len(drafts[b]) for b in live)
            stats.accepted += (keep - 1) * len(live)
            stats.per_pass.append((keep - 1) * len(live))
            session.truncate(start + keep)
            steps = [_Chosen([runs[b][j][0] if b in runs else None for b in range(len(rows))],
                             [runs[b][j][1] if b in runs else None for b in range(len(rows))]
                             if options.logprobs is not None else None,
                             [b in runs and runs[b][j][2] for b in range(len(rows))] if masks is not None else None)
                     for j in range(keep)]
            for chosen in steps[:-1]:  # the accepted drafts, one step each
                yield emit(chosen)
                if all(r is not None for r in why):
                    return
            pending = steps[-1]
    finally:
        if k and len(rows) == 1 and base is not None and generated[0] \
                and session.length > base + len(generated[0]) - 1:
            session.truncate(base + len(generated[0]) - 1)  # what plain decoding holds: all but the last token
        if run is not None:
            run.end()


@dataclass
class _Chosen:
    """One step's token per row (None: none), with each one's logprobs and whether its row's mask
    was done after it (None when logprobs or masks are off)."""

    tokens: list[int | None]
    logprobs: list | None = None
    done: list[bool] | None = None


def _verify(sampler: Sampler, logits: np.ndarray, seen: list[list[int]], generated: list[list[int]],
            masks: list[TokenMask] | None, drafts: list[list[int]],
            live: list[int]) -> dict[int, list[tuple[int, Any, bool]]]:
    """Each live row's tokens from one verify pass, position by position: the draft where the
    target accepts it, else the target's own token, which ends the pass for every row. Each token
    comes with its logprobs (:meth:`Sampler.logprob`) and whether its row's mask is done after it.

    ``logits[b, i]`` follows row b's fed token and ``drafts[b][:i]``; position i is processed with
    the history, generated ids and mask state plain decoding would have had there (each row's
    mask advances on its token at once, for the next position). A row whose drafts are all
    accepted gets the target's token after the last one. All rows stop at the first position
    where any row's pass ends (or any row's mask is done: nothing but the end may follow), so every
    row keeps the same count (a batched cache stays one column per token) and no token is drawn
    that is not kept: a mask never sees a rejected draft.
    """
    runs: dict[int, list[tuple[int, Any, bool]]] = {b: [] for b in live}
    for i in range(1 + max(len(drafts[b]) for b in live)):
        ended = False
        for b in live:
            so_far = [t for t, _, _ in runs[b]]
            history, new = seen[b] + so_far, generated[b] + so_far
            mask = masks[b] if masks is not None else None
            if i < len(drafts[b]):
                token = sampler.verify(logits[b, i], history, drafts[b][i], new, mask)
                ended |= token != drafts[b][i]
            else:
                token = sampler.pick(logits[b, i], history, new, mask)
                ended = True
            done = False
            if mask is not None:
                mask.advance(token)
                done = mask.done
                ended |= done
            runs[b].append((token, sampler.logprob(logits[b, i], token), done))
        if ended:
            break
    return runs


def _vocab_limit(model: "TextModel") -> int:
    try:
        return min(model.tokenizer.vocab_size, model.config.vocab_size)
    except (GenerationError, TokenizerError):  # no tokenizer files: any embedding row may be produced
        return model.config.vocab_size


def stream(model: "TextModel", prompt, **options) -> Iterator[str]:
    """Yield text deltas of one prompt's continuation; they concatenate to ``generate``'s result."""
    opts = GenerationOptions.from_kwargs(**options)
    rows, batched = _as_rows(model, prompt)
    if batched:
        raise GenerationError("stream takes one prompt; use generate for a batch")
    yield from stream_tokens(model, model.session(max_len=_max_len(model, rows, opts)), rows[0], opts)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two id lists: how much of a KV cache holding ``a`` serves ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Finish:
    """Why a stream ended, filled in by :func:`stream_tokens` for its caller.

    ``reason``: "stop" (a stop token or stop string), "length" (max_new_tokens), "context" (the
    session is full, or max_new_tokens was clamped to its room), "time" (max_time) or "cancelled"
    (the cancel callback). ``stop_string`` is the string that cut the text, if one did: the
    generated ids then hold more than the text shows.
    """

    reason: str | None = None
    stop_string: str | None = None
    text: str = ""  # all the text the stream yielded


@dataclass
class Step:
    """One step of a stream: the token generated and the text it makes visible (often "" while a
    UTF-8 character or a possible stop string is incomplete). The last step carries ``finish``;
    it has ``token`` None when it only flushes the text held back."""

    token: int | None
    text: str = ""
    finish: Finish | None = None
    logprob: float | None = None  # with options.logprobs: the token's log-probability under the model
    top_logprobs: list[tuple[int, float]] | None = None  # ... and the most likely (id, logprob), best first
    stop: bool = False  # the token is a stop token (eos, <eom>…): not part of the text


def stream_steps(model: "TextModel", session: "Session", row: list[int], opts: GenerationOptions, *,
                 history: list[int] | None = None, should_stop: StopCheck | None = None,
                 fit_context: bool = False) -> Iterator[Step]:
    """Each step of ``row``'s continuation in ``session``: token, text delta, and at the end why it stopped.

    Stop tokens are reported as steps (their text is not shown); the texts concatenate to
    ``finish.text``. ``history``, ``should_stop`` and ``fit_context``: see :func:`generate_ids`.
    """
    stops = _Stops.build(model, opts.stop)
    decoder = model.tokenizer.stream_decoder(skip_special_tokens=opts.skip_special_tokens)
    finish = Finish()
    reasons: list[str | None] = []
    scores: list = []
    text, emitted = "", 0
    for step in generate_ids(model, session, [row], opts, histories=[history or []], should_stop=should_stop,
                             fit_context=fit_context, reasons=reasons,
                             logprobs_out=scores if opts.logprobs is not None else None):
        token = step[0]
        if token is None:
            break
        logprob, top = scores[0] if scores and scores[0] is not None else (None, None)
        if stops.token_hit([token]):
            yield Step(token, logprob=logprob, top_logprobs=top, stop=True)
            break  # a single-token stop (eos, <eoc>…) is not part of the text
        text += decoder.push(token)
        cut = stops.text_cut(text)
        if cut is not None:
            finish.reason, finish.stop_string, finish.text = "stop", _stop_at(stops, text, cut), text[:cut]
            yield Step(token, text[emitted:cut], finish, logprob, top)
            return
        safe = len(text) - stops.held_back(text)
        yield Step(token, text[emitted:safe], logprob=logprob, top_logprobs=top)
        emitted = max(emitted, safe)
    finish.reason = reasons[0]  # generate_ids says why it ended (a single-token stop: "stop")
    text += decoder.flush()
    cut = stops.text_cut(text)
    if cut is not None:
        finish.reason, finish.stop_string = "stop", _stop_at(stops, text, cut)
    end = cut if cut is not None else len(text)
    finish.text = text[:end]
    yield Step(None, text[emitted:end], finish)


def stream_tokens(model: "TextModel", session: "Session", row: list[int], opts: GenerationOptions,
                  history: list[int] | None = None, tokens_out: list[int] | None = None,
                  finish: Finish | None = None, *, should_stop: StopCheck | None = None,
                  fit_context: bool = False) -> Iterator[str]:
    """The text deltas of :func:`stream_steps` (used by ``stream`` and batched streams).

    The generated ids (stop tokens included) are appended to ``tokens_out`` when given; ``finish``
    says why the stream ended once it has.
    """
    for step in stream_steps(model, session, row, opts, history=history, should_stop=should_stop,
                             fit_context=fit_context):
        if step.token is not None and tokens_out is not None:
            tokens_out.append(step.token)
        if step.finish is not None and finish is not None:
            done = step.finish
            finish.reason, finish.stop_string, finish.text = done.reason, done.stop_string, done.text
        if step.text:
            yield step.text


def _stop_at(stops: _Stops, text: str, cut: int) -> str:
    return next(s for s in stops.strings if text.startswith(s, cut))


def _max_len(model: "TextModel", rows: list[list[int]], opts: GenerationOptions) -> int:
    longest = max(len(r) for r in rows)
    context = model.config.n_positions
    plan = getattr(model, "plan", None)
    if plan is not None and plan.max_seq_len < context:  # loaded with a shorter context (-c, max_seq_len=)
        context = plan.max_seq_len
        if longest >= context:
            raise ContextLengthError(f"the prompt has {longest} tokens but the context is {context} positions "
                                     "(-c/--ctx-size, max_seq_len=): raise it or shorten the prompt")
    if longest >= context:
        raise ContextLengthError(
            f"the prompt has {longest} tokens but the model has n_positions={model.config.n_positions}; shorten it"
        )
    return min(context, longest + opts.max_new_tokens)


def generate(model: "TextModel", prompt, **options) -> str | list[str]:
    """Generated text for a prompt, or a list of texts for a list of prompts (one padded batch)."""
    opts = GenerationOptions.from_kwargs(**options)
    rows, batched = _as_rows(model, prompt)
    if not batched:
        return "".join(stream_tokens(model, model.session(max_len=_max_len(model, rows, opts)), rows[0], opts))
    session = model.session(batch=len(rows), max_len=_max_len(model, rows, opts))
    stops = _Stops.build(model, opts.stop)
    outs: list[list[int]] = [[] for _ in rows]
    for step in generate_ids(model, session, rows, opts):
        for b, token in enumerate(step):
            if token is not None:
                outs[b].append(token)
    texts = []
    for ids in outs:
        n = stops.token_hit(ids)
        text = model.tokenizer.decode(ids[: len(ids) - n], skip_special_tokens=opts.skip_special_tokens)
        cut = stops.text_cut(text)
        texts.append(text if cut is None else text[:cut])
    return texts


def generate_tokens(model: "TextModel", prompt_ids: Sequence[int], **options) -> list[int]:
    """Generated token ids for one prompt of ids (stop tokens excluded); no tokenizer needed."""
    opts = GenerationOptions.from_kwargs(**options)
    opts = replace(opts, stop=tuple(s for s in opts.stop if not isinstance(s, str)))  # ids need no tokenizer
    rows = [list(map(int, prompt_ids))]
    stops = _Stops.build(model, opts.stop)
    out: list[int] = []
    for step in generate_ids(model, model.session(max_len=_max_len(model, rows, opts)), rows, opts):
        if step[0] is None:
            break
        out.append(step[0])
    return out[: len(out) - stops.token_hit(out)]
