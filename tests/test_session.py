"""A Session runs a prompt in the plan's prefill chunks and gets what one pass would give.

The plan bills working buffers (attention scores, MLP activations) for ``plan.prefill_chunk``
tokens, so a longer prompt must go through the model chunk by chunk, the KV cache growing; the
logits must not change (fp32 tolerance), nor the decode that follows. Chunks before the last
compute no logits (the head is skipped, its weights still taken in the streaming order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jmoss
from test_engine import write_random_store

SHAPE = dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=3, vocab_size=512, n_positions=64)
ROWS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 2, 3, 4]]  # the second row is left-padded


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_random_store(tmp_path_factory.mktemp("session") / "store", SHAPE)


class Recorder:
    """Wraps a model's ``net.forward`` to record (tokens, last_only, logits) of every forward, and
    counts the head computations (``net.head``)."""

    def __init__(self, model):
        self.calls: list[tuple[int, bool, bool]] = []
        self.heads = 0
        self._forward, self._head = model.net.forward, model.net.head
        model.net.forward = self
        model.net.head = self._count_head

    def _count_head(self, h, w):
        self.heads += 1
        return self._head(h, w)

    def __call__(self, embeddings, layer, head, cache, step, last_only=False, logits=True):
        self.calls.append((embeddings.shape[1], last_only, logits))
        return self._forward(embeddings, layer, head, cache, step, last_only, logits)


def _real(logits: np.ndarray) -> list[np.ndarray]:
    """Logits of real tokens only (a pad position attends to nothing real: its values are noise)."""
    width = logits.shape[1]
    return [logits[b, width - len(r):] for b, r in enumerate(ROWS)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_chunked_prefill_equals_one_pass(store, dtype):
    model = jmoss.load(store, device="cpu", dtype=dtype, prefill_chunk=4)
    assert model.plan.prefill_chunk == 4
    recorder = Recorder(model)
    chunked = model.session(batch=2, max_len=32)
    assert chunked.prefill_chunk == 4
    one_pass = model.session(batch=2, max_len=32)
    one_pass.prefill_chunk = 64

    all_chunked = chunked.prefill(ROWS, last_only=False)
    assert recorder.calls == [(4, False, True), (4, False, True), (3, False, True)] and recorder.heads == 3
    all_once = one_pass.prefill(ROWS, last_only=False)
    assert all_chunked.shape == all_once.shape == (2, 11, SHAPE["vocab_size"])
    for a, b in zip(_real(all_chunked), _real(all_once)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    chunked.reset()
    one_pass.reset()
    recorder.calls.clear()
    recorder.heads = 0
    last_chunked = chunked.prefill(ROWS)
    # only the last chunk's last position reaches the head; the chunks before it only fill the cache
    assert recorder.calls == [(4, True, False), (4, True, False), (3, True, True)] and recorder.heads == 1
    np.testing.assert_allclose(last_chunked, one_pass.prefill(ROWS), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(last_chunked, all_once[:, -1], rtol=1e-4, atol=1e-4)
    assert chunked.length == one_pass.length == 11
    np.testing.assert_array_equal(chunked.next_position, one_pass.next_position)
    np.testing.assert_array_equal(chunked.key_mask, one_pass.key_mask)
    for _ in range(2):  # the cache the chunks wrote is the cache one pass writes
        tokens = np.argmax(last_chunked, axis=-1)
        last_chunked = chunked.decode(tokens)
        np.testing.assert_allclose(last_chunked, one_pass.decode(tokens), rtol=1e-4, atol=1e-4)


def test_a_prompt_appended_later_is_chunked_from_the_cache_end(store):
    model = jmoss.load(store, device="cpu", dtype="float32", prefill_chunk=3)
    chunked, one_pass = model.session(max_len=32), model.session(max_len=32)
    one_pass.prefill_chunk = 64
    first, second = list(range(20, 27)), list(range(40, 48))
    chunked.prefill([first])
    one_pass.prefill([first])
    np.testing.assert_allclose(chunked.prefill([second], last_only=False), one_pass.prefill([second], last_only=False),
                               rtol=1e-4, atol=1e-4)


def test_a_failed_chunk_leaves_the_session_as_it_was(store):
    model = jmoss.load(store, device="cpu", dtype="float32", prefill_chunk=2)
    session = model.session(max_len=32)
    session.prefill([[3, 4, 5]])
    forward, calls = model.net.forward, []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    model.net.forward = fail_on_second
    with pytest.raises(RuntimeError):
        session.prefill([[6, 7, 8, 9, 10]])
    model.net.forward = forward
    assert session.length == 3 and session.next_position.tolist() == [3]
    assert session.key_mask[0].tolist() == [1, 1, 1] + [0] * 29


def test_chunks_that_skip_the_head_keep_a_streaming_pipeline_in_order(store):
    """Under a budget that streams every layer and the head, chunks before the last still take the
    head's weights (the reader prefetches in plan order) but compute no logits; the result and the
    decode after it equal a resident one-pass prefill, and the pipeline never restarts."""
    from jmoss.placement import plan_placement

    resident = jmoss.load(store, device="cpu", dtype="float32")
    minimum = plan_placement(resident.config, device="cpu", device_memory=1 << 40, host_memory=None,
                             weight_itemsize=4, prefill_chunk=4).minimum_device_bytes
    streamed = jmoss.load(store, device="cpu", dtype="float32", device_memory=minimum + (16 << 10), prefill_chunk=4)
    assert streamed.plan.streams and streamed.plan.groups_on("disk")
    recorder = Recorder(streamed)
    session, one_pass = streamed.session(batch=2, max_len=32), resident.session(batch=2, max_len=32)
    one_pass.prefill_chunk = 64
    streamed.weights.stats.reset()
    restarts, start = [], streamed.weights._start
    streamed.weights._start = lambda base: (restarts.append(base), start(base))
    got = session.prefill(ROWS)
    assert restarts == []
    assert recorder.calls == [(4, True, False), (4, True, False), (3, True, True)] and recorder.heads == 1
    assert streamed.weights.stats.forwards == 3  # the head's weights were taken by every chunk, in order
    want = one_pass.prefill(ROWS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    tokens = np.argmax(got, axis=-1)
    np.testing.assert_allclose(session.decode(tokens), one_pass.decode(tokens), rtol=1e-4, atol=1e-4)
    streamed.weights.close()
