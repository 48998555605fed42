"""The streaming pipeline: a reader thread filling slot buffers in plan order, device-agnostic.

A ``Plan`` (jmoss.placement) says which groups of the store stay resident and which are read
from disk (or host memory) for every forward pass. ``StreamPipeline`` is the part every backend
shares: streamed groups are handed out in a fixed cyclic sequence, each filled by one background
thread into one of ``prefetch_depth`` slots allocated at start-up; the backends
(``jmoss.engine.cpu``, ``jmoss.engine.cuda``) own the buffers and say how a slot is filled.

Jittor is lazy (jittor-notes §7): ops built for layer ``i`` run at the next sync, so a slot may be
refilled only after the computation that read it has executed. When a streamed group is
requested the pipeline therefore syncs first (``_sync``), which runs everything built so far
(the previous layer), and only then hands the previous slot back to the reader thread. With two
slots this is double buffering: the read of layer ``i+1`` overlaps the compute of layer ``i``.
The cost of those syncs is measured and kept in ``stats.sync_seconds``.

The reader runs ahead cyclically, across forward passes: while the resident layers, the head and
sampling run, the first streamed layers of the next token are already being read.

Also here: ``read_span`` (one group's contiguous bytes by ``preadv``, hashed on first read, then
dropped from the page cache), shared by every backend, and ``EngineStats``.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from jmoss.errors import StoreError
from jmoss.layout import EMBED, HEAD, Group, all_groups
from jmoss.placement import slot_layout

_STOP = -1


# ------------------------------------------------------------------------------ file reading


def _fadvise_dontneed(fd: int, offset: int, nbytes: int) -> None:
    """Drop a range from the page cache (clean pages only; a no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


_HASH_CHUNK = 4 << 20  # with a hasher, read this much at a time and hash it while it is in cache


def read_span(fd: int, out: memoryview, offset: int, *, drop_cache: bool = True, hasher: Any = None) -> int:
    """Fill ``out`` from ``fd`` at ``offset`` with preadv (the GIL is released while the kernel
    copies), then drop the range from the page cache. Raises StoreError on a short file.

    With ``hasher`` (``Store.span_hasher``) each chunk is fed to it right after it is read."""
    done, total = 0, len(out)
    while done < total:
        stop = total if hasher is None else min(total, done + _HASH_CHUNK)
        n = os.preadv(fd, [out[done:stop]], offset + done)
        if n <= 0:
            raise StoreError(f"unexpected end of store file at byte {offset + done}; run `jmoss verify` on the store")
        if hasher is not None:
            hasher.update(out[done : done + n])
        done += n
    if drop_cache:
        _fadvise_dontneed(fd, offset, total)
    return total


# ------------------------------------------------------------------------------ accounting


@dataclasses.dataclass
class EngineStats:
    """What the engine measured since the last ``reset`` (all times in seconds).

    ``bytes_consumed`` counts the streamed bytes handed to the model (exactly the plan's
    ``disk_bytes_per_token`` per forward); ``bytes_read`` counts the reader's I/O, which runs up to
    ``prefetch_depth`` groups ahead. ``read_seconds`` is time inside preadv (and widening),
    ``wait_seconds`` time the model waited for a group not yet read, ``sync_seconds`` time in
    the layer-boundary ``jt.sync_all()`` (it includes the compute of the previous layer).
    """

    forwards: int = 0
    groups_consumed: int = 0
    bytes_consumed: int = 0
    groups_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    wait_seconds: float = 0.0
    sync_seconds: float = 0.0

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, field.default)

    @property
    def bytes_per_forward(self) -> float:
        """Streamed bytes per forward pass (= per decode token at batch 1)."""
        return self.bytes_consumed / self.forwards if self.forwards else 0.0

    @property
    def read_gbps(self) -> float:
        """Decimal GB/s while the reader was inside preadv: the disk path's own speed."""
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        out = dataclasses.asdict(self)
        out["bytes_per_forward"] = self.bytes_per_forward
        out["read_gbps"] = self.read_gbps
        return out


_layout_key = slot_layout  # the plan and every engine name a slot's layouts the same way


# ------------------------------------------------------------------------------ the engine


class StreamPipeline:
    """The device-agnostic core: a reader thread filling ``depth`` slots in plan order.

    Subclasses own the buffers and say how to fill a slot (``_fill``), how a filled slot looks to
    the model (``_slot_weights``) and how to make sure the compute that read a slot has executed
    (``_sync``). Sequence numbers count streamed groups handed out; group ``sequence[s % len]``
    lives in slot ``s % depth``.
    """

    def _init_pipeline(self, sequence: list[Group], depth: int, spans: dict[Group, tuple[int, int]]) -> None:
        self.stats = EngineStats()
        self._sequence = sequence
        self._seq_index = {g: k for k, g in enumerate(sequence)}
        self._spans = spans
        self.depth = depth if sequence else 0
        self._resident: dict[Group, Mapping] = {}
        self._consumed = 0  # next sequence number the model will take
        self._held = 0  # sequence numbers below this have had their slots released
        self._thread: threading.Thread | None = None
        self._free: threading.Semaphore | None = None
        self._ready: queue.Queue | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def _fill(self, slot: int, g: Group) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _slot_weights(self, slot: int, g: Group) -> Mapping:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sync(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- the reader thread -------------------------------------------------------------
    def _reader(self, first: int, free: threading.Semaphore, ready: queue.Queue) -> None:
        """Background loop: read sequence numbers first, first+1, ... into free slots, in order."""
        seq = first
        try:
            while not self._stop.is_set():
                while not free.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._fill(seq % self.depth, self._sequence[seq % len(self._sequence)])
                ready.put(seq)
                seq += 1
        except BaseException as exc:  # surfaced to the model thread at its next request
            self._error = exc
            ready.put(_STOP)

    def _start(self, base: int) -> None:
        """(Re)start the reader at sequence number ``base`` (group ``sequence[base % len]``)."""
        self._stop.clear()
        self._free = threading.Semaphore(self.depth)
        self._ready = queue.Queue()
        self._consumed = self._held = base
        self._thread = threading.Thread(target=self._reader, args=(base, self._free, self._ready),
                                        name="jmoss-reader", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ---- what the model calls ----------------------------------------------------------
    def layer(self, i: int) -> Mapping:
        """Weights of layer ``i`` as jittor Vars (valid until the next streamed group is requested)."""
        return self._get(i)

    def head(self) -> Mapping:
        """Final LayerNorm and lm_head; one call per forward pass."""
        self.stats.forwards += 1
        return self._get(HEAD)

    def _get(self, g: Group) -> Mapping:
        if g in self._resident:
            return self._resident[g]
        k, n = self._seq_index[g], len(self._sequence)
        if self._consumed % n != k:
            # An earlier forward stopped half-way (an exception): restart the pipeline at g.
            self._sync()
            self._halt()
            self._start(self._consumed + (k - self._consumed) % n)
        # Everything built so far reads slots of earlier groups: run it, then free those slots.
        self._sync()
        while self._held < self._consumed:
            self._free.release()
            self._held += 1
        t0 = time.perf_counter()
        seq = self._ready.get()
        self.stats.wait_seconds += time.perf_counter() - t0
        if seq == _STOP:
            error, self._error = self._error, None
            self._halt()
            self._start(self._consumed)
            raise StoreError(f"reading streamed weights failed: {error}") from error
        assert seq == self._consumed, (seq, self._consumed)
        self._consumed += 1
        self.stats.groups_consumed += 1
        self.stats.bytes_consumed += self._spans[g][1]
        return self._slot_weights(seq % self.depth, g)


def rss_bytes() -> int:
    """This process's resident set size now (psutil)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def store_files(store) -> list[Path]:
    """The layer and head files of a store (what the engine streams)."""
    return [store.group_path(g) for g in all_groups(store.config) if g != EMBED]
