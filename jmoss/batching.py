"""Continuous batching: many sequences, one forward (one pass over the weights) per step.

A :class:`BatchRunner` owns one KV cache for up to ``slots`` sequences and a thread that runs
the model. Each sequence is driven by its own code (``stream_tokens``, a Chat and its plugin
loop, the server's jobs) through a :class:`Slot`, which has a Session's interface: ``prefill``
and ``decode`` hand tokens to the runner and block until the step that processed them. The
runner gathers every slot that is waiting into one step, so sampling, stop strings, streaming,
plugin passes and cancellation stay per sequence, unchanged, while the weights are read once
per step for all of them. A slot joins at the next step and leaves when its code stops asking.

Cache layout: per-slot rows with a shared write cursor. A step writes columns
``[cursor, cursor + W)`` of every row; a row's new tokens are right-aligned in that window
(decode rows use its last column, a joining row's prefill chunk fills up to W of them), the rest
are pads hidden by the per-row key mask. Positions are per row (the row's own token count), so a
row's tokens need not be contiguous in the cache: attention only sees real keys, each rotated
at its own position, which is what the sequence run alone computes (the model's attention and
the CPU kernel already take a per-row [B, 1, T, S] mask). When the cursor would pass
``max_len``, the cache is repacked: each row's real tokens are moved right-aligned to the longest
row, which also drops rows of slots nobody uses and grows the cache for slots that join. The
cache has as many rows as slots in use (not ``slots``), so one client pays for one row.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from jmoss.errors import BudgetError, ContextLengthError, GenerationError, JmossError
from jmoss.model import KVCache, make_step
from jmoss.session import planned_length

if TYPE_CHECKING:
    from jmoss.protocols import ForwardModel
    from jmoss.session import TextModel

# Tokens one step may carry for prefill (split over the rows that prefill in it). Decode rows
# are padded to the step's width, so a smaller chunk keeps joining cheap for those already decoding.
STEP_TOKENS = 256
# A verify pass (a token and its drafts, jmoss.lookup) is never split over steps: a step carries at
# least this many tokens per row.
VERIFY_TOKENS = 16
GATHER_SECONDS = 0.02  # longest wait for a slot that just got its logits to ask for the next step


class StepCancelled(JmossError):
    """The slot's cancel flag was set while its tokens waited for a step."""


@dataclass
class _Request:
    tokens: list[int]
    every: bool = False  # a verify pass: the logits of every token, not only the last
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    parts: list[np.ndarray] = field(default_factory=list)  # every=True: logits of the steps so far
    error: BaseException | None = None


class Slot:
    """One sequence in a BatchRunner, with the interface of a one-row :class:`jmoss.session.Session`.

    ``owner``/``ids`` are for whoever leases the slot (the server keeps what the cache holds there).
    """

    batch = 1
    prefill_chunk = VERIFY_TOKENS  # the widest verify pass (generation reads it as a Session's)

    def __init__(self, runner: "BatchRunner", index: int):
        self.runner, self.index, self.max_len = runner, index, runner.max_len
        self.cols: list[int] = []  # cache columns of this sequence's tokens, in order
        self.row: int | None = None  # its row in the runner's cache (None: it has none yet)
        self.busy = False
        self.cancel: threading.Event | None = None
        self.broken = False
        self.owner: Any = None
        self.ids: list[int] = []
        self.last_used = 0.0

    @property
    def length(self) -> int:
        return len(self.cols)

    @property
    def room(self) -> int:
        return self.max_len - self.length

    def reset(self) -> None:
        with self.runner._cv:
            self.cols, self.broken = [], False

    def truncate(self, length: int) -> None:
        with self.runner._cv:
            if not 0 <= length <= len(self.cols):
                raise GenerationError(f"cannot truncate a session of {len(self.cols)} tokens to {length}")
            del self.cols[length:]

    def prefill(self, rows: Sequence[Sequence[int]] | np.ndarray, last_only: bool = True) -> np.ndarray:
        if not last_only:
            raise GenerationError("a batched slot returns the last position's logits only")
        rows = [list(map(int, r)) for r in rows]
        if len(rows) != 1:
            raise GenerationError(f"a batched slot holds 1 sequence, got {len(rows)} rows")
        if not rows[0]:
            raise GenerationError("prefill needs at least one token per row")
        return self.runner._submit(self, rows[0])

    def decode(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.runner._submit(self, [int(t) for t in np.asarray(tokens).reshape(-1)])

    def verify(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """A fed token and its drafts in one step; logits of every position [1, n, V] (see Session.verify)."""
        rows = [list(map(int, r)) for r in rows]
        if len(rows) != 1 or not 0 < len(rows[0]) <= VERIFY_TOKENS:
            raise GenerationError(f"a batched slot verifies 1 to {VERIFY_TOKENS} tokens of 1 sequence")
        return self.runner._submit(self, rows[0], every=True)


class DetachedSession:
    """What a Chat built for a BatchRunner holds until a turn leases it a slot: no cache, no tokens."""

    batch, length = 1, 0

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.room = max_len

    def reset(self) -> None:
        pass

    def truncate(self, length: int) -> None:
        if length:
            raise GenerationError("this conversation holds no cache slot now")


class BatchRunner:
    """Up to ``slots`` sequences of at most ``max_len`` tokens, advanced together one step at a time."""

    def __init__(self, model: "ForwardModel", slots: int, max_len: int | None = None, *, step_tokens: int = STEP_TOKENS,
                 gather_seconds: float = GATHER_SECONDS):
        if not isinstance(slots, int) or slots < 1:
            raise BudgetError(f"the batch must be a positive number of sequences, got {slots!r}")
        max_len = planned_length(model, slots, max_len)
        self.model, self.max_len, self.step_tokens, self.gather_seconds = model, max_len, step_tokens, gather_seconds
        self.slots = [Slot(self, i) for i in range(slots)]
        self._rows: list[Slot] = []  # the slot of each cache row
        self._cache: KVCache | None = None
        self._cursor = 0
        self._cv = threading.Condition()
        self._pending: dict[Slot, _Request] = {}
        self._expect: set[Slot] = set()  # slots just served: they will likely ask again at once
        self._stopped = False
        self.steps = 0  # forwards run
        self.row_steps = 0  # sequences advanced, summed over steps (row_steps / steps: the mean batch)
        self.repacks = 0
        self._thread = threading.Thread(target=self._loop, name="jmoss-batch-runner", daemon=True)
        self._thread.start()

    # -- leases (any thread) -------------------------------------------------------------------
    def acquire(self, score: Callable[[Slot], float] | None = None) -> Slot:
        """A free slot (the highest ``score``, then the least recently used); waits while none is free."""
        with self._cv:
            while True:
                free = [s for s in self.slots if not s.busy]
                if free:
                    best = max(free, key=lambda s: ((score(s) if score else 0.0), -s.last_used))
                    best.busy = True
                    return best
                self._cv.wait()

    def release(self, slot: Slot) -> None:
        with self._cv:
            slot.busy, slot.cancel, slot.last_used = False, None, time.monotonic()
            self._expect.discard(slot)
            self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    @property
    def rows(self) -> int:
        """Rows the cache has now (each costs one sequence of compute per step)."""
        return len(self._rows)

    # -- the step (job threads submit, the runner thread computes) -----------------------------
    def _submit(self, slot: Slot, tokens: list[int], every: bool = False) -> np.ndarray:
        if slot.broken:
            raise GenerationError("an earlier batched step failed; this sequence's cache is gone (start it again)")
        if slot.length + len(tokens) > self.max_len:
            raise ContextLengthError(
                f"{slot.length} cached + {len(tokens)} new tokens exceed this session's {self.max_len} positions "
                f"(the model has n_positions={self.model.config.n_positions}); shorten the prompt or start a new session")
        vocab = self.model.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise GenerationError(f"token ids must be in 0..{vocab - 1}")
        request = _Request(list(tokens), every)
        with self._cv:
            if self._stopped:
                raise GenerationError("the batch runner has stopped")
            self._pending[slot] = request
            self._cv.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.logits is not None
        return request.logits

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    for request in self._pending.values():
                        request.error = GenerationError("the batch runner has stopped")
                        request.done.set()
                    return
                deadline = time.monotonic() + self.gather_seconds
                while (self._expect - set(self._pending)) and not self._stopped:  # let the others catch up
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                self._drop_cancelled()
                if not self._pending:
                    continue
                work = self._prepare()
            if work is None:
                with self._cv:
                    self._cv.wait(0.01)  # a full row that is not asking blocks the cursor: wait for its release
                continue
            self._run(*work)

    def _drop_cancelled(self) -> None:
        for slot, request in list(self._pending.items()):
            if slot.cancel is not None and slot.cancel.is_set():
                del self._pending[slot]
                request.error = StepCancelled("the request was cancelled")
                request.done.set()

    def _prepare(self):
        """Under the lock: the rows, widths and masks of the next step (repacking the cache if needed)."""
        pending = self._pending
        if any(s.row is None for s in pending) or sum(not s.busy for s in self._rows) > len(self._rows) // 2:
            self._repack()
        rows = len(self._rows)
        chunk = max(VERIFY_TOKENS, self.step_tokens // rows)
        width = max(min(chunk, len(r.tokens)) for r in pending.values())
        if self._cursor + width > self.max_len:
            self._repack()
            rows = len(self._rows)
        width = min(width, self.max_len - self._cursor)
        if width < 1:
            return None
        tail = 1  # logits kept per row: the last position, or every token of a verify pass in this step
        start, total = self._cursor, self._cursor + width
        ids = np.zeros((rows, width), dtype=np.int64)
        positions = np.zeros((rows, width), dtype=np.int64)
        key_mask = np.zeros((rows, total), dtype=np.int8)
        taken: list[tuple[Slot, _Request, int]] = []
        for r, slot in enumerate(self._rows):
            if slot.cols:
                key_mask[r, slot.cols] = 1
            request = pending.get(slot)
            if request is None:
                continue
            n = min(width, len(request.tokens))
            ids[r, width - n:] = request.tokens[:n]
            positions[r, width - n:] = np.arange(slot.length, slot.length + n)
            key_mask[r, total - n:total] = 1
            taken.append((slot, request, n))
            if request.every:
                tail = max(tail, n)
        return start, ids, positions, key_mask, taken, tail

    def _run(self, start: int, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray,
             taken: list[tuple[Slot, _Request, int]], tail: int = 1) -> None:
        model = self.model
        width = ids.shape[1]
        try:
            step = make_step(model.jt, model.config, model.rotary, start, positions, key_mask)
            out = model.net.forward(model.embed(ids), model.weights.layer, model.weights.head, self._cache, step,
                                    True, tail=tail).numpy()
        except BaseException as exc:  # every sequence in the cache is now suspect
            with self._cv:
                for slot in self.slots:
                    slot.broken = slot.busy and (bool(slot.cols) or slot in self._pending)
                    slot.cols, slot.row = [], None
                self._rows, self._cache, self._cursor = [], None, 0
                for slot, request in list(self._pending.items()):
                    request.error = exc if isinstance(exc, JmossError) else GenerationError(f"batched step failed: {exc}")
                    request.done.set()
                self._pending.clear()
            return
        with self._cv:
            self.steps += 1
            self.row_steps += len(taken)
            self._cursor = start + width
            served = set()
            for slot, request, n in taken:
                slot.cols.extend(range(start + width - n, start + width))
                del request.tokens[:n]
                if request.every:  # this row's n tokens are the last n of the step's columns
                    request.parts.append(out[slot.row, tail - n:, :].copy())
                if not request.tokens:
                    if request.every:
                        request.logits = np.concatenate(request.parts, axis=0)[None]
                    else:
                        request.logits = out[slot.row : slot.row + 1, -1, :].copy()
                    del self._pending[slot]
                    served.add(slot)
                    request.done.set()
            self._expect = {s for s in served if s.busy}

    def _repack(self) -> None:
        """Rebuild the cache: rows for the slots in use or asking, each row's tokens right-aligned."""
        keep = [s for s in self._rows if s.busy or s in self._pending]
        keep += [s for s in self._pending if s.row is None]
        for s in self._rows:
            if s not in keep:
                s.cols, s.row = [], None  # an idle slot's cache is given up (its owner re-reads it)
        longest = max((s.length for s in keep), default=0)
        model, config = self.model, self.model.config
        cache = model.net.new_cache(max(1, len(keep)), self.max_len, model.compute_dtype)
        if self._cache is not None and longest:
            olds = [(s.row, s.cols) for s in keep]
            for layer in range(config.n_layer):
                for new_buf, old_buf in ((cache.keys, self._cache.keys), (cache.values, self._cache.values)):
                    old = old_buf[layer].numpy()
                    new = np.zeros_like(old, shape=(len(keep),) + old.shape[1:])
                    for r, (row, cols) in enumerate(olds):
                        if row is not None and cols:
                            new[r, :, longest - len(cols):longest, :] = old[row, :, cols, :].transpose(1, 0, 2)
                    new_buf[layer] = model.jt.array(new)
        self._cache = cache
        for r, s in enumerate(keep):
            s.cols = list(range(longest - s.length, longest)) if s.row is not None else []
            s.row = r
        self._rows, self._cursor = keep, longest
        self.repacks += 1


# ----------------------------------------------------------------------------------------------
# The Python API's batched stream
# ----------------------------------------------------------------------------------------------


def stream_batch(model: "TextModel", prompts: Sequence, *, max_batch: int | None = None,
                 **options) -> Iterator[tuple[int, str]]:
    """``(index, text delta)`` for every prompt, generated together: finished prompts leave at once.

    Each prompt's text equals what ``model.stream(prompt)`` yields alone (greedy: the same tokens);
    ``max_batch`` (default: all) bounds how many run at once, the rest join as others finish.
    """
    import queue as queue_module

    from jmoss.generation import GenerationOptions, _as_rows, _max_len, stream_tokens

    opts = GenerationOptions.from_kwargs(**options)
    rows = [_as_rows(model, p)[0][0] for p in prompts]
    if not rows:
        return
    size = min(len(rows), max_batch or len(rows))
    runner = BatchRunner(model, size, max_len=max(_max_len(model, [r], opts) for r in rows))
    out: queue_module.SimpleQueue = queue_module.SimpleQueue()
    todo = iter(range(len(rows)))
    todo_lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        slot = runner.acquire()
        slot.cancel = stop
        try:
            while True:
                with todo_lock:
                    index = next(todo, None)
                if index is None:
                    return
                slot.reset()
                for delta in stream_tokens(model, slot, rows[index], opts):
                    out.put((index, delta))
        except StepCancelled:
            pass
        except BaseException as exc:
            out.put((-1, exc))
        finally:
            runner.release(slot)
            out.put(None)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(size)]
    for thread in workers:
        thread.start()
    running = size
    try:
        while running:
            item = out.get()
            if item is None:
                running -= 1
            elif item[0] == -1:
                raise item[1]
            else:
                yield item
    finally:
        stop.set()
        for thread in workers:
            thread.join()
        runner.stop()
