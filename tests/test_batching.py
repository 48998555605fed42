"""Continuous batching (jmoss.batching): sequences generated together give what each gives alone.

Greedy decoding on a tiny random MOSS: every sequence's tokens, run in one BatchRunner with
others that join and leave at different steps (different prompt lengths, max_new_tokens and stop
strings), must equal the same request run alone on a plain Session, and the alone run is
checked against transformers for a few prompts. The cache repacks (a small max_len forces it)
must not change a token either.
"""

from __future__ import annotations

import threading

import pytest
import torch

from jmoss.api import Model
from jmoss.batching import BatchRunner, StepCancelled
from jmoss.errors import BudgetError
from jmoss.generation import Finish, GenerationOptions, stream_tokens
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy

PROMPTS = ["Hello", "def fib(n):\n    return", "MOSS is a conversational model developed by Fudan University. It",
           "1 2 3 4 5 6", "你好，世界", "The quick brown fox jumps over the lazy dog and then",
           "<|Human|>: what is 2+2?<eoh>\n<|MOSS|>:", "a"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, shared_dir):
    torch_model, config = tiny_moss(seed=1)
    tok = moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok"))
    return torch_model, Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu", tokenizer_path=tok)


def _requests(model: Model) -> list[tuple[list[int], GenerationOptions]]:
    """8 requests: different lengths, budgets and stops (a stop string taken from the alone run's text)."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        opts = GenerationOptions(max_new_tokens=6 + 3 * i, do_sample=False, repetition_penalty=1.02 + 0.01 * i)
        out.append((model.tokenizer.encode(prompt), opts))
    # a stop string in the middle of request 2's greedy text: it must end early, at the same place
    ids, opts = out[2]
    text = "".join(stream_tokens(model, model.session(), ids, opts))
    if len(text) > 6:
        out[2] = (ids, GenerationOptions(**{**opts.__dict__, "stop": (text[4:6],)}))
    return out


def _alone(model: Model, ids: list[int], opts: GenerationOptions) -> tuple[str, list[int], str | None]:
    tokens: list[int] = []
    finish = Finish()
    text = "".join(stream_tokens(model, model.session(), ids, opts, tokens_out=tokens, finish=finish))
    return text, tokens, finish.reason


def _together(model: Model, requests, runner: BatchRunner, delays: list[int]) -> list[tuple[str, list[int], str | None]]:
    """Each request on its own thread and slot; request i starts once ``delays[i]`` steps have run."""
    results: list = [None] * len(requests)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            while runner.steps < delays[i]:
                threading.Event().wait(0.002)
            slot = runner.acquire()
            try:
                slot.reset()
                tokens: list[int] = []
                finish = Finish()
                text = "".join(stream_tokens(model, slot, requests[i][0], requests[i][1], tokens_out=tokens,
                                             finish=finish))
                results[i] = (text, tokens, finish.reason)
            finally:
                runner.release(slot)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_eight_concurrent_greedy_requests_equal_each_run_alone(pair, report):
    _, model = pair
    requests = _requests(model)
    alone = [_alone(model, ids, opts) for ids, opts in requests]
    assert alone[2][2] == "stop", "the stop string did not end request 2 early"
    runner = BatchRunner(model, 8)
    try:
        together = _together(model, requests, runner, delays=[0, 0, 1, 3, 3, 5, 8, 12])
    finally:
        runner.stop()
    for i, (got, want) in enumerate(zip(together, alone)):
        assert got == want, f"request {i}: batched {got!r} != alone {want!r}"
    report(f"8 concurrent greedy requests (joining at steps 0..12) = each alone: {runner.steps} batched steps for "
           f"{sum(len(a[1]) for a in alone)} generated tokens, {runner.repacks} cache repacks")


def test_repacking_a_full_cache_keeps_every_token(pair):
    _, model = pair
    requests = _requests(model)[:4]
    alone = [_alone(model, ids, opts) for ids, opts in requests]
    longest = max(len(ids) + opts.max_new_tokens for ids, opts in requests)
    runner = BatchRunner(model, 3, max_len=longest + 2, step_tokens=16)  # 4 requests on 3 slots: one waits
    try:
        together = _together(model, requests, runner, delays=[0, 2, 4, 6])
    finally:
        runner.stop()
    assert together == alone
    assert runner.repacks >= 3  # joins and a cursor that ran out of columns


def test_alone_greedy_matches_transformers(pair):
    torch_model, model = pair
    for ids, opts in _requests(model)[:3:2]:
        _, tokens, _ = _alone(model, ids, GenerationOptions(**{**opts.__dict__, "stop": ()}))
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=opts.max_new_tokens, do_sample=False,
                                       repetition_penalty=opts.repetition_penalty, pad_token_id=0)
        want = ref[0, len(ids):].tolist()
        assert tokens == want[: len(tokens)] and (len(tokens) == len(want) or tokens[-1] == model.config.eos_token_id)


def test_stream_batch_yields_what_stream_yields_alone(pair):
    _, model = pair
    opts = dict(max_new_tokens=12, do_sample=False, stop=["\n\n"])
    texts = [""] * len(PROMPTS)
    for index, delta in model.stream_batch(PROMPTS, max_batch=5, **opts):  # 8 prompts, 5 at a time
        texts[index] += delta
    assert texts == ["".join(model.stream(p, **opts)) for p in PROMPTS]


def test_a_cancelled_slot_stops_at_the_next_step(pair):
    _, model = pair
    runner = BatchRunner(model, 2)
    try:
        slot = runner.acquire()
        slot.cancel = threading.Event()
        slot.prefill([model.tokenizer.encode("Hello")])
        slot.cancel.set()
        with pytest.raises(StepCancelled):
            slot.decode([1])
        runner.release(slot)
        again = runner.acquire()
        again.reset()
        assert again.prefill([[1, 2, 3]]).shape == (1, model.config.vocab_size)
        runner.release(again)
    finally:
        runner.stop()


def test_the_batch_must_fit_the_memory_plan(pair):
    from jmoss.placement import plan_placement

    _, model = pair
    config = model.config
    one = plan_placement(config, device="cpu", device_memory=1 << 34, host_memory=None, max_seq_len=config.n_positions)
    four = plan_placement(config, device="cpu", device_memory=1 << 34, host_memory=None, max_seq_len=config.n_positions, batch=4)
    assert four.kv_bytes == 4 * one.kv_bytes
    model.plan = one
    try:
        with pytest.raises(BudgetError, match="batch=4"):
            BatchRunner(model, 4)
        model.plan = four
        BatchRunner(model, 4).stop()
    finally:
        model.plan = None
