"""OpenAI parameters clients send (issue #30, finding 6), through the official client.

presence_penalty / frequency_penalty as OpenAI defines them (logit[j] -= c[j] * frequency +
(c[j] > 0) * presence, c counting the tokens generated so far), ``n`` choices (through the batch
runner with ``--max-batch``), ``logprobs`` / ``top_logprobs`` of the chosen and the most likely
tokens (checked against the model's own full-forward logits), ``seed``, any ``model`` name, and
MOSS's own API capping a reply. The penalties run on a model whose logits the test fixes; the rest
on a tiny random MOSS loaded in this process.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import openai
import pytest

import jmoss
from jmoss.generation import GenerationOptions, Sampler
from jmoss.server import create_app
from moss_fixtures import MOSS_EOM
from test_server import MODEL_ID, build_store
from test_web import AppServer, ScriptedModel, ScriptedSession


# -- the sampler: OpenAI's penalties ---------------------------------------------------------------


def openai_penalised(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's formula, written out token by token (the reference the sampler must match)."""
    out = logits.astype(np.float64).copy()
    for j in set(generated):
        c = generated.count(j)
        out[j] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return out


def test_penalties_follow_openais_formula_over_generated_tokens_only():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    prompt, generated = [3, 3, 7], [5, 5, 5, 9, 11, 9]
    for presence, frequency in [(0.0, 0.7), (1.3, 0.0), (0.5, 0.25), (-0.4, -0.2)]:
        opts = GenerationOptions(do_sample=False, repetition_penalty=1.0, presence_penalty=presence,
                                 frequency_penalty=frequency)
        picked = Sampler(opts, vocab_limit=50).pick(logits, prompt + generated, generated)
        assert picked == int(openai_penalised(logits, generated, presence, frequency).argmax())
    # the prompt's tokens are not penalised: 3 is the best token and was only in the prompt
    logits[3] = 10
    opts = GenerationOptions(do_sample=False, repetition_penalty=1.0, presence_penalty=2, frequency_penalty=2)
    assert Sampler(opts, vocab_limit=50).pick(logits, prompt + generated, generated) == 3


def test_penalties_are_checked_in_openais_range():
    from jmoss.errors import GenerationError

    with pytest.raises(GenerationError, match="presence_penalty"):
        GenerationOptions(presence_penalty=2.5)
    with pytest.raises(GenerationError, match="logprobs"):
        GenerationOptions(logprobs=21)


class FixedSession(ScriptedSession):
    """Every step the same logits: the ranking the penalties must reorder."""

    def _next(self) -> np.ndarray:
        return self.model.logits[None, :].copy()


class FixedModel(ScriptedModel):
    def __init__(self, tokenizer, logits: np.ndarray):
        super().__init__(tokenizer, {})
        self.logits = logits

    def session(self, batch: int = 1, max_len: int | None = None) -> FixedSession:
        return FixedSession(self)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, shared_dir) -> Iterator[tuple[AppServer, list[int], np.ndarray]]:
    from jmoss.tokenizer import load_tokenizer
    from moss_fixtures import moss_tokenizer_dir

    tokenizer = load_tokenizer(moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok")))
    words = [tokenizer.encode(w)[0] for w in (" alpha", " beta", " gamma", " delta")]
    logits = np.full(107008, -20.0, dtype=np.float32)
    logits[words] = [10.0, 9.61, 9.33, 9.07]  # no ties on the way (float32)
    logits[MOSS_EOM] = 0.0
    srv = AppServer(create_app(FixedModel(tokenizer, logits), model_name=MODEL_ID, web=False))
    yield srv, words, logits
    srv.stop()


def test_presence_and_frequency_penalties_through_the_client(fixed):
    srv, words, logits = fixed
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def reply(**penalties) -> list[int]:
        out = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "go"}],
                                             max_tokens=8, temperature=0, extra_body={"repetition_penalty": 1.0},
                                             logprobs=True, **penalties)
        return [words[[" alpha", " beta", " gamma", " delta"].index(t.token)] for t in out.choices[0].logprobs.content]

    assert reply() == [words[0]] * 8  # no penalty: the top token every time
    for presence, frequency in [(0.0, 0.5), (0.8, 0.0), (0.3, 0.3)]:
        expected: list[int] = []
        for _ in range(8):  # OpenAI's definition, step by step
            expected.append(int(openai_penalised(logits, expected, presence, frequency).argmax()))
        got = reply(presence_penalty=presence, frequency_penalty=frequency)
        assert got == expected and len(set(got)) > 1, (presence, frequency, got)


# -- a tiny random MOSS: n, logprobs, seed ---------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_dir):
    return jmoss.load(build_store(tmp_path_factory.mktemp("params"), shared_dir), device="cpu")


@pytest.fixture(scope="module")
def batched(model) -> Iterator[AppServer]:
    srv = AppServer(create_app(model, model_name=MODEL_ID, web=False, max_tokens_limit=32, max_batch=3))
    yield srv
    srv.stop()


@pytest.fixture
def client(batched) -> openai.OpenAI:
    return openai.OpenAI(base_url=batched.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _fresh_server_run(loaded, **ask) -> list[str]:
    """The choices' texts of one request to a new server (max_batch 3: every slot empty, so every
    choice prefills the whole prompt). A served request may prefill only the part of the prompt a
    slot does not hold yet; those kernels give logits equal to ~1e-7, which is enough to flip a
    sampled near-tie: the seed fixes the draws, the cache's state must be the same too."""
    srv = AppServer(create_app(loaded, model_name=MODEL_ID, web=False, max_tokens_limit=32, max_batch=3))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(**ask)
        if ask.get("stream"):
            parts = {0: "", 1: "", 2: ""}
            for chunk in out:
                for choice in chunk.choices:
                    parts[choice.index] += choice.delta.content or ""
            return [parts[i] for i in range(3)]
        assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens >= 3
        return [c.message.content for c in out.choices]
    finally:
        srv.stop()


def test_n_choices_run_through_the_batch_runner_and_seed_reproduces_them(client, batched, model):
    ask = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12, n=3,
               temperature=1.0, seed=7)
    texts = _fresh_server_run(model, **ask)
    assert len(set(texts)) > 1  # three samples, not one
    assert _fresh_server_run(model, **ask) == texts  # seed: the same three again
    assert _fresh_server_run(model, **ask, stream=True) == texts  # streamed too
    greedy = client.chat.completions.create(**{**ask, "temperature": 0})
    assert len({c.message.content for c in greedy.choices}) == 1  # greedy: every choice is the argmax path
    completions = client.completions.create(model=MODEL_ID, prompt="def fib(n):", max_tokens=6, n=2, temperature=0)
    assert [c.index for c in completions.choices] == [0, 1]


def test_logprobs_are_the_models_own(client, model):
    out = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=3,
                                         extra_body={"repetition_penalty": 1.0})
    content = out.choices[0].logprobs.content
    tok = model.tokenizer
    from jmoss import dialogue
    from jmoss.generation import generate_tokens

    ids = (tok.encode(dialogue.base_meta_instruction())
           + tok.encode(dialogue.human("Hi") + dialogue.prefix(dialogue.MOSS)))
    generated = generate_tokens(model, ids, max_new_tokens=6, do_sample=False, repetition_penalty=1.0,
                                stop=[MOSS_EOM])
    assert len(content) == len(generated) > 0  # one entry per token of the reply (the stop token has none)
    logits = model.logits([ids + generated])[0, len(ids) - 1:, : tok.vocab_size].astype(np.float64)
    for step, entry in enumerate(content):
        row = logits[step]
        logp = row - (row.max() + math.log(np.exp(row - row.max()).sum()))
        assert bytes(entry.bytes) == tok.decode_bytes([generated[step]])
        assert abs(entry.logprob - logp[generated[step]]) < 1e-3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the most likely
        assert abs(entry.top_logprobs[0].logprob - logp.max()) < 1e-3 and len(entry.top_logprobs) == 3
    legacy = client.completions.create(model=MODEL_ID, prompt="def fib(n):", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_any_model_name_is_served(client):
    out = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=2, temperature=0)
    assert out.model == MODEL_ID and out.choices[0].message.content is not None
