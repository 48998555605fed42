"""Generation: greedy parity with transformers, seeded sampling, stops, time limit, streaming."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from jmoss.api import Model
from jmoss.errors import GenerationError
from jmoss.generation import GenerationOptions, Sampler, generate_tokens
from moss_fixtures import MOSS_EOM, moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy


@pytest.fixture(scope="module")
def pair(tmp_path_factory, shared_dir):
    torch_model, config = tiny_moss()
    tok = moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok"))
    model = Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu", tokenizer_path=tok)
    return torch_model, model


def test_greedy_equals_transformers_generate_with_repetition_penalty(pair, report):
    torch_model, model = pair
    prompt = model.tokenizer.encode("<|Human|>: 你好，MOSS！<eoh>\n<|MOSS|>:")
    ours = generate_tokens(model, prompt, do_sample=False, max_new_tokens=24, repetition_penalty=1.02)
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                                   repetition_penalty=1.02, eos_token_id=MOSS_EOM, pad_token_id=MOSS_EOM)
    ref_ids = ref[0, len(prompt):].tolist()
    if ref_ids and ref_ids[-1] == MOSS_EOM:
        ref_ids = ref_ids[:-1]
    report(f"greedy with repetition_penalty 1.02: {len(ours)} tokens, identical={ours == ref_ids}")
    assert ours == ref_ids


def test_sampling_with_a_seed_is_reproducible(pair):
    _, model = pair
    a = model.generate("Hello", max_new_tokens=16, seed=123)
    b = model.generate("Hello", max_new_tokens=16, seed=123)
    c = model.generate("Hello", max_new_tokens=16, seed=124)
    assert a == b
    assert a != c


def test_stream_concatenates_to_generate_including_chinese(pair):
    _, model = pair
    prompt = "<|Human|>: 请用中文介绍一下复旦大学。<eoh>\n<|MOSS|>:"
    deltas = list(model.stream(prompt, max_new_tokens=40, seed=7, temperature=1.0, top_p=1.0))
    assert "".join(deltas) == model.generate(prompt, max_new_tokens=40, seed=7, temperature=1.0, top_p=1.0)
    assert all(isinstance(d, str) and d for d in deltas)


def test_string_stop_cuts_the_text_and_ends_generation(pair):
    _, model = pair
    full = model.generate("Once upon a time", do_sample=False, max_new_tokens=30)
    assert len(full) > 8
    stop = full[4:8]
    cut = model.generate("Once upon a time", do_sample=False, max_new_tokens=30, stop=[stop])
    assert cut == full[: full.index(stop)]
    streamed = "".join(model.stream("Once upon a time", do_sample=False, max_new_tokens=30, stop=[stop]))
    assert streamed == cut


def test_token_stop_ends_generation(pair):
    _, model = pair
    prompt = model.tokenizer.encode("Once upon a time")
    full = generate_tokens(model, prompt, do_sample=False, max_new_tokens=20)
    stopped = generate_tokens(model, prompt, do_sample=False, max_new_tokens=20, stop=[full[5]])
    assert stopped == full[: full.index(full[5])]


def test_max_time_is_honoured(pair):
    _, model = pair
    start = time.monotonic()
    model.generate("Tell me a long story", max_new_tokens=200, max_time=0.3)
    assert time.monotonic() - start < 0.3 + 2.0  # the limit, plus one step and the prefill


def test_batched_prompts_equal_single_prompts(pair):
    _, model = pair
    prompts = ["A short one", "一个更长一点的中文提示，用来检验左侧填充"]
    batch = model.generate(prompts, do_sample=False, max_new_tokens=12)
    assert batch == [model.generate(p, do_sample=False, max_new_tokens=12) for p in prompts]


def test_sampler_order_top_k_then_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    opts = GenerationOptions(do_sample=True, temperature=1.0, top_k=3, top_p=0.7, repetition_penalty=1.0, seed=0)
    sampler = Sampler(opts, 4)
    picks = {sampler.pick(logits, []) for _ in range(200)}
    assert picks == {0, 1}  # top-k keeps 3; top-p 0.7 keeps the smallest prefix reaching 0.7 of that


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.9, -1.0], dtype=np.float32)
    opts = GenerationOptions(do_sample=False, repetition_penalty=2.0)
    assert Sampler(opts, 4).pick(logits, [0]) == 2  # 2.0 / 2 = 1.0 < 1.9
    assert Sampler(opts, 4).pick(np.array([-1.0, -2.0, -1.5], np.float32), [0]) == 2  # -1 * 2 = -2 < -1.5


def test_ids_past_the_tokenizer_are_never_produced(pair):
    _, model = pair
    logits = np.zeros(model.config.vocab_size, dtype=np.float32)
    logits[-1] = 100.0  # an embedding padding row
    opts = GenerationOptions(do_sample=False)
    assert Sampler(opts, model.tokenizer.vocab_size).pick(logits, []) < model.tokenizer.vocab_size


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(top_p=1.5), dict(temperature=0), dict(top_k=-1),
                                 dict(unknown_option=1)])
def test_bad_options_are_clear_errors(pair, bad):
    _, model = pair
    with pytest.raises(GenerationError):
        model.generate("x", **bad)


def test_stream_says_why_it_finished(pair):
    from jmoss.generation import Finish, stream_tokens

    _, model = pair
    prompt = model.tokenizer.encode("<|Human|>: 你好<eoh>\n<|MOSS|>:")

    def run(max_len: int | None = None, **options) -> tuple[str, Finish]:
        finish = Finish()
        opts = GenerationOptions.from_kwargs(do_sample=False, **options)
        session = model.session(max_len=max_len or len(prompt) + opts.max_new_tokens)
        text = "".join(stream_tokens(model, session, prompt, opts, finish=finish))
        return text, finish

    whole, finish = run(max_new_tokens=12)
    assert (finish.reason, finish.stop_string, finish.text) == ("length", None, whole)
    stop = whole[4:7]
    cut, finish = run(max_new_tokens=12, stop=[stop])
    assert (finish.reason, finish.stop_string, finish.text) == ("stop", stop, whole[: whole.index(stop)]) and cut == finish.text
    first = generate_tokens(model, prompt, do_sample=False, max_new_tokens=1)[0]
    _, finish = run(max_new_tokens=12, stop=[first])
    assert finish.reason == "stop"
    _, finish = run(max_len=len(prompt) + 5, max_new_tokens=12)
    assert finish.reason == "context"


def test_a_cancel_callback_ends_the_stream_with_cancelled(pair):
    from jmoss.generation import Finish, stream_tokens

    _, model = pair
    prompt = model.tokenizer.encode("<|Human|>: 你好<eoh>\n<|MOSS|>:")
    opts = GenerationOptions.from_kwargs(do_sample=False, max_new_tokens=40, stop=[])
    tokens: list[int] = []
    finish = Finish()
    session = model.session(max_len=len(prompt) + 40)
    text = "".join(stream_tokens(model, session, prompt, opts, tokens_out=tokens, finish=finish,
                                 should_stop=lambda: len(tokens) >= 3))
    assert finish.reason == "cancelled" and len(tokens) == 3 and finish.text == text
    assert session.length == len(prompt) + 2  # the third token was sampled, never fed: no step ran after the cancel
    # cancelled before it starts: nothing is prefilled
    finish, idle = Finish(), model.session(max_len=len(prompt) + 40)
    assert "".join(stream_tokens(model, idle, prompt, opts, finish=finish, should_stop=lambda: True)) == ""
    assert finish.reason == "cancelled" and idle.length == 0


def test_fit_context_clamps_max_tokens_to_the_room_and_says_context(pair):
    from jmoss.errors import ContextLengthError
    from jmoss.generation import Finish, fit_to_context, stream_tokens

    _, model = pair
    assert fit_to_context(100, 10, 64) == 54 and fit_to_context(8, 10, 64) == 8
    with pytest.raises(ContextLengthError, match="no room"):
        fit_to_context(8, 64, 64)
    prompt = model.tokenizer.encode("<|Human|>: 你好<eoh>\n<|MOSS|>:")
    opts = GenerationOptions.from_kwargs(do_sample=False, max_new_tokens=50, stop=[])
    tokens: list[int] = []
    finish = Finish()
    session = model.session(max_len=len(prompt) + 6)
    list(stream_tokens(model, session, prompt, opts, tokens_out=tokens, finish=finish, fit_context=True))
    assert finish.reason == "context" and len(tokens) == 6
    finish = Finish()
    list(stream_tokens(model, model.session(max_len=len(prompt) + 6), prompt,
                       GenerationOptions.from_kwargs(do_sample=False, max_new_tokens=4, stop=[]), finish=finish,
                       fit_context=True))
    assert finish.reason == "length"


def test_stream_steps_report_each_token_and_finish_at_the_end(pair):
    from jmoss.generation import stream_steps

    _, model = pair
    prompt = model.tokenizer.encode("<|Human|>: 你好<eoh>\n<|MOSS|>:")
    opts = GenerationOptions.from_kwargs(do_sample=False, max_new_tokens=10, stop=[])
    steps = list(stream_steps(model, model.session(max_len=len(prompt) + 10), prompt, opts))
    assert [s.token for s in steps if s.token is not None] == generate_tokens(model, prompt, do_sample=False,
                                                                            max_new_tokens=10, stop=[])
    assert all(s.finish is None for s in steps[:-1]) and steps[-1].finish.reason == "length"
    assert "".join(s.text for s in steps) == steps[-1].finish.text


def _top_p_by_full_sort(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Hugging Face's top-p warper as it is written: sort everything ascending, drop the prefix
    whose cumulative probability is <= 1 - top_p, always keep the most likely token."""
    from jmoss.generation import _softmax

    order = np.argsort(scores)
    remove = np.cumsum(_softmax(scores[order])) <= 1.0 - top_p
    remove[-1] = False
    return np.sort(order[~remove])


def test_top_p_keeps_what_sorting_the_whole_vocabulary_keeps():
    """The sampler finds the nucleus among the top candidates only (a full 107,008-entry sort per
    token cost more than a small model's forward); the kept set must be the full sort's, from a
    nucleus of one token to most of the vocabulary."""
    from jmoss.generation import _top_p_kept

    rng = np.random.default_rng(0)
    for size in (5, 300, 107008):
        for sharpness in (0.05, 0.5, 2.0, 8.0):
            scores = (rng.standard_normal(size) * sharpness).astype(np.float32)
            for top_p in (1e-6, 0.3, 0.8, 0.95, 0.999):
                kept, weights = _top_p_kept(scores, top_p)
                assert np.array_equal(kept, _top_p_by_full_sort(scores, top_p)), (size, sharpness, top_p)
                assert np.allclose(weights, np.exp(scores[kept].astype(np.float64) - scores.max()))
    masked = np.full(1000, -np.inf, np.float32)
    masked[[3, 500, 999]] = [1.0, 3.0, 2.0]  # top_k left three finite scores
    assert list(_top_p_kept(masked, 0.8)[0]) == [500, 999]


def test_top_p_with_a_wide_nucleus_sorts_only_its_boundary():
    """A nucleus beyond the first candidates (a flat distribution: a random model, a high
    temperature) is found by binning the scores; ties, -inf and weights that underflow to 0 are
    handled as the full sort handles them."""
    from jmoss.generation import _top_p_kept

    rng = np.random.default_rng(1)
    scores = (rng.standard_normal(50_000) * 0.3).astype(np.float32)
    scores[rng.choice(scores.size, 20_000, replace=False)] = -np.inf  # a mask
    scores[:10] = -800.0  # finite, but exp underflows to 0 beside the rest
    for top_p in (0.5, 0.9, 0.99999):
        kept, _ = _top_p_kept(scores, top_p)
        assert kept.size > 1000
        assert np.array_equal(kept, _top_p_by_full_sort(scores, top_p)), top_p
    even = np.zeros(1000, np.float32)  # every score equal: which ids is a tie-break, how many is not
    kept, weights = _top_p_kept(even, 0.5505)  # off the 1/1000 steps: no rounding at the boundary
    assert kept.size == _top_p_by_full_sort(even, 0.5505).size == 551 and np.all(np.diff(kept) > 0)
    assert np.all(weights == 1.0)
