"""Constrained sampling: the sampler's token-mask hook (jmoss.generation) and JSON schemas (jmoss.constraints).

The model here is a stand-in at the model boundary: MOSS's real tokenizer and config, logits drawn
at random per row and step, so nothing but the masks can make the output valid JSON.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from jmoss.config import MossConfig
from jmoss.constraints import json_schema
from jmoss.errors import ConstraintError, GenerationError
from jmoss.generation import GenerationOptions, Sampler, generate_ids
from jmoss.stats import Stats
from jmoss.tokenizer import load_tokenizer
from moss_fixtures import MOSS_EOM, moss_tokenizer_dir

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": -3, "maximum": 300},
    "kind": {"enum": ["plain", "with \"quotes\"", "back\\slash"]},
    "list": {"type": "array", "maxItems": 3, "items": {"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 9}},
    "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}},
    "required": ["name", "n", "kind", "list", "inner"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_dir):
    return load_tokenizer(moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok")))


class RandomSession:
    """Session-shaped: every step, fresh random logits for each row."""

    def __init__(self, vocab: int, seed: int, max_len: int = 2048):
        self.vocab, self.rng, self.max_len, self.length = vocab, np.random.default_rng(seed), max_len, 0
        self.rows = 0

    @property
    def room(self) -> int:
        return self.max_len - self.length

    def prefill(self, rows, last_only: bool = True) -> np.ndarray:
        self.rows = len(rows)
        self.length += max(len(r) for r in rows)
        return self.rng.normal(0, 3, (self.rows, self.vocab)).astype(np.float32)

    def decode(self, tokens) -> np.ndarray:
        self.length += 1
        return self.rng.normal(0, 3, (self.rows, self.vocab)).astype(np.float32)


class RandomModel:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.config = MossConfig(vocab_size=107008, n_positions=2048, n_embd=64, n_layer=1, n_head=4, rotary_dim=8)
        self.stats = Stats()


def _rows(model, constraint, rows: int, seed: int, **options) -> tuple[list[list[int]], list]:
    opts = GenerationOptions.from_kwargs(max_new_tokens=120, constraint=constraint, seed=seed, **options)
    out: list[list[int]] = [[] for _ in range(rows)]
    reasons: list = []
    prompts = [model.tokenizer.encode(f"prompt {i}") for i in range(rows)]
    for step in generate_ids(model, RandomSession(model.config.vocab_size, seed), prompts, opts, reasons=reasons):
        for b, t in enumerate(step):
            if t is not None:
                out[b].append(t)
    return out, reasons


def test_random_logits_under_a_schema_always_give_valid_json_each_row_its_own_mask(tokenizer):
    model = RandomModel(tokenizer)
    constraint = json_schema(tokenizer, SCHEMA, eos_token_id=MOSS_EOM)
    texts, total = [], 0
    for seed, options in enumerate([dict(do_sample=False), dict(temperature=1.0, top_p=1.0),
                                    dict(temperature=0.7, top_p=1.0, top_k=40), dict(temperature=1.3, top_p=0.95)]):
        rows, reasons = _rows(model, constraint, 4, seed, **options)
        total += sum(map(len, rows))
        assert reasons == ["stop"] * 4
        for ids in rows:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            jsonschema.validate(json.loads(text), SCHEMA)
            texts.append(text)
    assert len(set(texts)) > 8  # the rows went their own ways, each mask following its own row
    assert any('\\"' in t or "\\\\" in t for t in texts)  # escaped strings were written and parsed back
    snap = model.stats.snapshot()
    assert snap["generations"] == 4 and snap["constrained"] == 4 and snap["running"] == 0
    assert snap["completion_tokens"] == total and snap["prompt_tokens"] == 4 * sum(
        len(tokenizer.encode(f"prompt {i}")) for i in range(4))
    assert snap["ttft_count"] == 4 and snap["tpot_count"] == 4


def test_the_mask_comes_after_the_repetition_penalty_and_before_temperature_and_top_k():
    vocab = 8
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0], dtype=np.float32)

    class Allow:
        done = False

        def __init__(self, ids):
            self.m = np.zeros(vocab, bool)
            self.m[list(ids)] = True

        def mask(self):
            return self.m

        def advance(self, token):
            pass

        def rollback(self, n):
            pass

    greedy = Sampler(GenerationOptions(do_sample=False, repetition_penalty=10.0), vocab)
    # 0 is best but forbidden; 1 is allowed but was seen, so the penalty (first) makes it 0.4 < 3
    assert greedy.pick(logits, history=[1], mask=Allow({1, 2})) == 2
    assert greedy.pick(logits, history=[], mask=Allow({1, 2})) == 1
    # top-k counts allowed ids only: k=1 under the mask keeps the best allowed one, whatever the rest
    top1 = Sampler(GenerationOptions(do_sample=True, temperature=5.0, top_k=1, seed=0, repetition_penalty=1.0), vocab)
    assert {top1.pick(logits, [], mask=Allow({3, 6})) for _ in range(20)} == {3}
    # high temperature spreads the probability over the allowed ids only
    hot = Sampler(GenerationOptions(do_sample=True, temperature=50.0, top_p=1.0, seed=0, repetition_penalty=1.0), vocab)
    assert {hot.pick(logits, [], mask=Allow({4, 7})) for _ in range(50)} == {4, 7}
    with pytest.raises(GenerationError):
        greedy.pick(logits, [], mask=Allow(set()))


def test_max_new_tokens_cuts_an_unbounded_document_with_reason_length(tokenizer):
    model = RandomModel(tokenizer)
    endless = json_schema(tokenizer, {"type": "array", "items": {"type": "string"}, "minItems": 9}, eos_token_id=MOSS_EOM)
    opts = GenerationOptions.from_kwargs(max_new_tokens=6, constraint=endless, do_sample=False)
    reasons: list = []
    steps = list(generate_ids(model, RandomSession(model.config.vocab_size, 0), [[1, 2]], opts, reasons=reasons))
    assert reasons == ["length"] and len(steps) == 6
    text = tokenizer.decode([s[0] for s in steps])
    assert text.startswith("[")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_a_matcher_rolls_back_along_a_rejected_draft(tokenizer):
    mask = json_schema(tokenizer, SCHEMA, eos_token_id=MOSS_EOM).start()
    prefix = tokenizer.encode('{"name": "ab')
    for t in prefix[:2]:
        mask.advance(t)
    before = mask.mask().copy()
    for t in prefix[2:]:
        mask.advance(t)
    mask.rollback(len(prefix) - 2)
    assert np.array_equal(mask.mask(), before)
    with pytest.raises(GenerationError):
        mask.advance(tokenizer.encode("}")[0])  # not allowed after '{"': the matcher says so


def test_leading_space_is_allowed_only_for_replies(tokenizer):
    space = tokenizer.encode(" {")[0]
    assert json_schema(tokenizer, SCHEMA, eos_token_id=MOSS_EOM, leading_space=True).start().mask()[space]
    assert not json_schema(tokenizer, SCHEMA, eos_token_id=MOSS_EOM).start().mask()[space]


@pytest.mark.parametrize("schema,feature", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "object", "x-guidance": {"lenient": True}, "properties": {"a": {"contains": {}}}}, "contains"),
])
def test_what_cannot_be_enforced_is_refused_by_name(tokenizer, schema, feature):
    with pytest.raises(ConstraintError) as info:
        json_schema(tokenizer, schema, eos_token_id=MOSS_EOM)
    assert feature in str(info.value)


def test_a_constraint_must_start_masks():
    with pytest.raises(GenerationError):
        GenerationOptions.from_kwargs(constraint={"type": "object"})
