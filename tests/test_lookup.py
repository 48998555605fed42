"""Prompt-lookup speculative decoding (jmoss.lookup + jmoss.generation): output unchanged.

Most tests run a ForcedModel (tests/forced_model.py): its logits are a rule of the tokens each
position can see, read back from the real KV cache, so the test decides which drafts the target
agrees with (accepted, partly accepted, rejected) and a cache left with a rejected draft would
change the output. Greedy output with lookup must be plain greedy's token for token, with the same
finish reason and the same cache, at a stop string, at max_new_tokens, at the context limit,
across chat turns (with the plugin loop), in a batch of 4 rows that accept differently, and on a
real model under a streaming budget. Sampling is checked against the target distribution with a
chi-square test. Last, a real random-weight model: greedy with lookup equals greedy without.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from forced_model import ForcedModel, Script, forced, visible_ids
from jmoss.batching import BatchRunner
from jmoss.chat import Chat
from jmoss.errors import GenerationError
from jmoss.generation import Finish, GenerationOptions, Sampler, generate, generate_ids, stream_tokens
from jmoss.lookup import LookupStats, PromptLookup, parse_lookup
from moss_fixtures import MOSS_EOM, moss_tokenizer_dir

K = 4  # drafts per pass in these tests (lookup=K, so no device policy decides)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shared_dir) -> Path:
    return moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from jmoss.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def _babble(tokenizer) -> list[int]:
    return tokenizer.encode(" alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho")


REPEATED = " the quick brown fox jumps over the lazy dog near the river bank"
PROMPT = "<|Human|>: Say it again:" + REPEATED + ", and again:" + REPEATED + ".<eoh>\n<|MOSS|>:"
# accepted (the sentence again), partly accepted (a word changed), rejected (new words), then <eom>
REPLY = REPEATED + "," + REPEATED.replace("lazy", "sleepy") + ", with 42 purple zebras dancing slowly"


def _model(tokenizer, tok_dir, script: list[tuple[str, str]], **kwargs) -> ForcedModel:
    pairs = [(tokenizer.encode(t), tokenizer.encode(c) + [MOSS_EOM]) for t, c in script]
    return ForcedModel(Script(pairs, _babble(tokenizer)), tokenizer_path=tok_dir, **kwargs)


def _run(model, ids: list[int], lookup, *, session=None, trace: list | None = None, stats: LookupStats | None = None,
         **opts) -> tuple[list[int], str | None, object]:
    """Greedy tokens, finish reason and session of one generation; ``trace`` gets, per yielded
    step, (tokens so far, the ids the cache holds)."""
    session = session or model.session(max_len=opts.pop("max_len", 256))
    options = GenerationOptions(do_sample=False, lookup=lookup, **{"max_new_tokens": 200, **opts})
    reasons: list = []
    out: list[int] = []
    for step in generate_ids(model, session, [ids], options, reasons=reasons, stats=stats):
        if step[0] is not None:
            out.append(step[0])
        if trace is not None:
            trace.append((len(out), visible_ids(session)))
    return out, reasons[0], session


# -- the drafter ---------------------------------------------------------------------------------


def test_drafter_proposes_what_followed_the_latest_longest_match():
    d = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3], max_ngram=3)
    assert d.propose(2) == [5, 6]  # "2 3" last followed by 5 6 (the latest occurrence, not 1 2 3 4)
    d.extend([5])
    assert d.propose(3) == [6, 2, 3]  # "2 3 5" (3-gram) wins over "3 5" and "5"
    assert PromptLookup([7, 8, 9]).propose(4) == []  # the suffix itself is never its own match
    d = PromptLookup([1, 2, 1, 2, 1], max_ngram=2)
    assert d.propose(5) == [2, 1]  # continuation runs up to the end of the sequence


def test_the_lookup_option_is_off_auto_or_a_draft_length():
    assert parse_lookup("off") == 0 and parse_lookup(0) == 0 and parse_lookup("auto") == "auto"
    assert parse_lookup("6") == 6 and parse_lookup(3) == 3
    for bad in ("fast", -1, 99, True, 2.5):
        with pytest.raises(GenerationError):
            parse_lookup(bad)
    with pytest.raises(GenerationError):
        GenerationOptions(lookup="sometimes")


def test_auto_is_on_where_a_pass_of_a_few_rows_costs_about_one_row(shared_dir, monkeypatch):
    from types import SimpleNamespace

    from jmoss.config import MossConfig
    from jmoss.layout import resolved
    from jmoss.lookup import AUTO_DRAFT, auto_drafts, draft_limit
    from jmoss.placement import plan_placement

    moss = MossConfig.from_json_file(shared_dir / "assets" / "moss-moon-003-sft" / "config.json")
    moss_int4 = resolved(MossConfig(**{**moss.__dict__, "wbits": 4, "groupsize": 128}))
    small = MossConfig.from_json_file(shared_dir / "assets" / "codegen-350M-mono" / "config.json")

    def model(config, device="cpu", **budget):
        plan = plan_placement(config, device=device, device_memory=budget.get("memory"), host_memory=None)
        return SimpleNamespace(config=config, plan=plan)

    # resident on a CPU: the kernels are bound by compute, each row costs (bench_lookup.py passes)
    assert auto_drafts(model(moss_int4)) == 0
    assert auto_drafts(model(moss)) == 0
    assert auto_drafts(model(small)) == 0
    # streamed every token (disk, PCIe) or on CUDA: reading the weights bounds a pass
    streamed = model(moss_int4, memory=6 << 30)
    assert streamed.plan.streams and auto_drafts(streamed) == AUTO_DRAFT
    assert auto_drafts(model(small, "cuda")) == AUTO_DRAFT
    assert auto_drafts(SimpleNamespace(plan=None)) == 0  # built without a plan (tests, from_state_dict)
    # resident int4 in the int8 compute mode where its passes run the VNNI tiles (on any CPU: the build
    # probe stubbed both ways; the real one decides on this machine)
    from jmoss import kernels
    from jmoss.lookup import AUTO_DRAFT_CPU_VNNI

    with kernels.configured(quant_compute="int8"):
        assert auto_drafts(model(moss_int4)) == (AUTO_DRAFT_CPU_VNNI if kernels.q8_vnni_ready() else 0)
    for vnni in (True, False):
        monkeypatch.setattr(kernels, "q8_vnni_ready", lambda vnni=vnni: vnni)
        with kernels.configured(quant_compute="int8"):
            assert auto_drafts(model(moss_int4)) == (AUTO_DRAFT_CPU_VNNI if vnni else 0)
            assert auto_drafts(model(moss)) == 0  # fp16 weights: the fp32 GEMV tiles
            odd = resolved(MossConfig(**{**moss.__dict__, "wbits": 4, "groupsize": 48}))
            assert auto_drafts(model(odd)) == 0  # groups the int8 decode kernels leave to fp32
            int8 = resolved(MossConfig(**{**moss.__dict__, "wbits": 8, "groupsize": 128}))
            assert auto_drafts(model(int8)) == 0  # not measured: int8 stores keep lookup off
        assert auto_drafts(model(moss_int4)) == 0  # the default, exact fp32 mode
    session = SimpleNamespace(verify=None, prefill_chunk=3)
    assert draft_limit("auto", streamed, session) == 2  # a pass stays one prefill chunk
    assert draft_limit(8, streamed, SimpleNamespace(prefill_chunk=512)) == 0  # no verify: a stand-in
    assert draft_limit("off", streamed, session) == 0


# -- greedy output unchanged -------------------------------------------------------------------


def test_greedy_equals_plain_with_drafts_accepted_partly_accepted_and_rejected(tokenizer, tok_dir, report):
    model = _model(tokenizer, tok_dir, [("<|MOSS|>:", REPLY)])
    ids = tokenizer.encode(PROMPT)
    plain, plain_why, plain_session = _run(model, ids, "off")
    stats = LookupStats()
    model.passes.clear()
    ours, why, session = _run(model, ids, K, stats=stats)
    assert ours == plain and why == plain_why == "stop"
    assert tokenizer.decode(ours[:-1]) == REPLY
    assert visible_ids(session) == visible_ids(plain_session) and session.length == plain_session.length
    full = [n for n in stats.per_pass if n == K]
    partial = [n for n in stats.per_pass if 0 < n < K]
    rejected = [n for n in stats.per_pass if n == 0]
    assert full and partial and rejected, stats.per_pass
    assert stats.passes < len(plain) - 1  # fewer forwards than plain decoding's one per token
    report(f"forced model, {len(ours)} tokens: {stats.passes} passes instead of {len(plain) - 1} "
           f"({stats.verify_passes} verify: {len(full)} all {K} accepted, {len(partial)} partly, {len(rejected)} none)")


def test_the_cache_holds_what_plain_decoding_holds_at_every_step(tokenizer, tok_dir):
    model = _model(tokenizer, tok_dir, [("<|MOSS|>:", REPLY)])
    ids = tokenizer.encode(PROMPT)
    plain_trace: list = []
    trace: list = []
    plain, _, _ = _run(model, ids, "off", trace=plain_trace)
    ours, _, _ = _run(model, ids, K, trace=trace)
    assert ours == plain
    plain_at = {n: cached for n, cached in plain_trace}
    sequence = ids + ours
    for n, cached in trace:
        # what plain decoding holds after n tokens, then possibly tokens it writes at later steps;
        # never a rejected draft
        assert cached[: len(plain_at[n])] == plain_at[n]
        assert cached == sequence[: len(cached)]
    same = sum(cached == plain_at[n] for n, cached in trace)
    assert same >= len(trace) // 2 and trace[-1][1] == plain_trace[-1][1]


def test_a_stop_string_inside_an_accepted_run_ends_at_the_same_text(tokenizer, tok_dir):
    model = _model(tokenizer, tok_dir, [("<|MOSS|>:", REPLY)])
    prompt = PROMPT
    stop = "lazy dog near"  # inside the second, fully drafted copy of the sentence
    texts = {}
    for lookup in ("off", K):
        finish = Finish()
        tokens: list[int] = []
        session = model.session(max_len=256)
        opts = GenerationOptions(do_sample=False, lookup=lookup, stop=(stop,), max_new_tokens=200)
        text = "".join(stream_tokens(model, session, tokenizer.encode(prompt), opts, tokens_out=tokens,
                                     finish=finish))
        texts[lookup] = (text, tokens, finish.reason, finish.stop_string, visible_ids(session))
    assert texts[K] == texts["off"]
    assert texts[K][0] == REPLY[: REPLY.index(stop)] and texts[K][2] == "stop"


@pytest.fixture(scope="module")
def cut_points(tokenizer, tok_dir) -> list[int]:
    """Token counts at which an unlimited lookup run is in the middle of a pass's accepted drafts
    (its cache is two or more tokens ahead of plain decoding's), the first and a later one."""
    model = _model(tokenizer, tok_dir, [("<|MOSS|>:", REPLY)])
    ids = tokenizer.encode(PROMPT)
    trace: list = []
    _run(model, ids, K, trace=trace)
    inside = [n for n, cached in trace if len(cached) >= len(ids) + n + 1]
    assert len(inside) >= 4
    return [inside[0], inside[len(inside) // 2]]


@pytest.mark.parametrize("which", [0, 1])
def test_max_new_tokens_inside_an_accepted_run(tokenizer, tok_dir, cut_points, which):
    model = _model(tokenizer, tok_dir, [("<|MOSS|>:", REPLY)])
    ids = tokenizer.encode(PROMPT)
    for max_new in (1, cut_points[which]):
        plain = _run(model, ids, "off", max_new_tokens=max_new)
        ours = _run(model, ids, K, max_new_tokens=max_new)
        assert ours[:2] == plain[:2] and len(ours[0]) == max_new and ours[1] == "length"
        assert visible_ids(ours[2]) == visible_ids(plain[2])


@pytest.mark.parametrize("which", [0, 1])
def test_the_context_limit_inside_an_accepted_run(tokenizer, tok_dir, cut_points, which):
    model = _model(tokenizer, tok_dir, [("<|MOSS|>:", REPLY)])
    ids = tokenizer.encode(PROMPT)
    for fit in (False, True):
        room = cut_points[which] - (0 if fit else 1)  # the run ends at the cut point's token
        results = []
        for lookup in ("off", K):
            session = model.session(max_len=len(ids) + room)
            options = GenerationOptions(do_sample=False, lookup=lookup, max_new_tokens=200)
            reasons: list = []
            out = [s[0] for s in generate_ids(model, session, [ids], options, reasons=reasons, fit_context=fit)]
            results.append((out, reasons, visible_ids(session), session.length))
        assert results[1] == results[0]
        assert results[0][1] == ["context"] and len(results[0][0]) == cut_points[which]


# -- an output constraint (a TokenMask) and logprobs -----------------------------------------------

JSON_A = '{"name": "fox", "n": 42, "list": [1, 2, 3], "ok": true}'  # what the prompt holds, twice
JSON_B = JSON_A.replace("42", "7")  # the schema's "n" is at most 9
JSON_PROMPT = "<|Human|>: Repeat: " + JSON_A + " and again: " + JSON_A + "<eoh>\n<|MOSS|>:"
JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                "n": {"type": "integer", "maximum": 9},
                                                "list": {"type": "array", "items": {"type": "integer"}},
                                                "ok": {"type": "boolean"}},
               "required": ["name", "n", "list", "ok"], "additionalProperties": False}


class _Recorded:
    """A Constraint whose masks write down every advance and rollback (into ``log``)."""

    def __init__(self, inner):
        self.inner, self.log = inner, []

    def start(self):
        return _RecordedMask(self.inner.start(), self.log)


class _RecordedMask:
    def __init__(self, inner, log: list):
        self.inner, self.log = inner, log

    @property
    def done(self) -> bool:
        return self.inner.done

    def mask(self):
        return self.inner.mask()

    def advance(self, token: int) -> None:
        self.log.append(int(token))
        self.inner.advance(token)

    def rollback(self, n: int) -> None:
        del self.log[len(self.log) - n:]
        self.inner.rollback(n)


def _prefers_a_then_b(tokenizer, vocab: int):
    """A rule: after <|MOSS|>: the model most wants JSON_A (logit 30), then JSON_B (20), then <eom>.
    Unmasked it writes JSON_A; a mask that forbids A's 42 makes it write JSON_B, and drafts taken
    from the prompt (JSON_A) are then cut by the mask, not by the model."""
    trigger, a, b = (tokenizer.encode(t) for t in ("<|MOSS|>:", JSON_A, JSON_B))
    def rule(history: tuple[int, ...]) -> np.ndarray:
        at = max(i for i in range(len(history) - len(trigger) + 1) if list(history[i:i + len(trigger)]) == trigger)
        done = list(history[at + len(trigger):])
        logits = np.zeros(vocab, dtype=np.float32)
        logits[MOSS_EOM] = 10.0
        for text, weight in ((b, 20.0), (a, 30.0)):
            if done == text[: len(done)]:
                logits[text[len(done)] if len(done) < len(text) else MOSS_EOM] = weight
        return logits

    return rule


def test_a_json_schema_mask_and_logprobs_with_lookup(tokenizer, tok_dir, report):
    """Under a real JSON-schema mask (jmoss.constraints) and with logprobs: the same tokens, finish
    reason, cache and logprobs (every token, accepted drafts included) as without lookup; the mask
    advanced on exactly the emitted tokens (a pass's tokens past a row's end rolled back); drafts
    the model wants but the mask forbids are rejected."""
    from jmoss.constraints import json_schema

    model = ForcedModel(lambda history: 0, tokenizer_path=tok_dir)
    model.rule = _prefers_a_then_b(tokenizer, model.config.vocab_size)
    ids = tokenizer.encode(JSON_PROMPT)
    schema = json_schema(tokenizer, JSON_SCHEMA, eos_token_id=MOSS_EOM)
    stats = LookupStats()
    ends = {}
    for max_new in (60, 9):  # the JSON closes (the mask is done); a cut inside a pass's accepted drafts
        results = {}
        for lookup in ("off", K):
            constraint = _Recorded(schema)
            options = GenerationOptions(do_sample=False, lookup=lookup, max_new_tokens=max_new,
                                        constraint=constraint, logprobs=2)
            session = model.session(max_len=256)
            reasons: list = []
            scores: list = []
            out, probs = [], []
            for step in generate_ids(model, session, [ids], options, reasons=reasons, logprobs_out=scores,
                                     stats=stats if lookup else None):
                if step[0] is not None:
                    out.append(step[0])
                    probs.append(scores[0])
            assert constraint.log == out  # every emitted token advanced the mask once, nothing else did
            assert len(probs) == len(out) and all(p is not None and len(p[1]) == 2 for p in probs)
            results[lookup] = (out, reasons, probs, visible_ids(session))
        assert results[K] == results["off"]
        ends[max_new] = results[K]
    assert tokenizer.decode(ends[60][0]) == JSON_B and ends[60][1] == ["stop"]  # the mask's closed JSON ends it
    assert ends[9][1] == ["length"] and len(ends[9][0]) == 9
    assert stats.accepted > 0 and any(n < K for n in stats.per_pass)  # drafts kept, and some the mask cut
    report(f"JSON schema + logprobs with lookup: the same tokens and logprobs as plain, {stats.accepted}/"
           f"{stats.drafted} drafts accepted in {stats.verify_passes} verify passes")


def test_chat_turns_with_the_plugin_loop_are_unchanged(tokenizer, tok_dir, report):
    from jmoss import dialogue

    thoughts = "<|Inner Thoughts|>: The user wants 2+3 and the user wants it twice<eot>\n<|Commands|>: Calculate(\"2+3\")<eoc>"
    script = [
        ("<|Human|>: What is 2+3? Say the answer twice.<eoh>\n", thoughts),
        ("<|MOSS|>:", " The result of 2+3 is 5. Again: the result of 2+3 is 5."),
        ("<|Human|>: And again, please.<eoh>\n",
         "<|Inner Thoughts|>: The user wants it again<eot>\n<|Commands|>: None<eoc>"),
    ]
    pairs = [(tokenizer.encode(t), tokenizer.encode(c) + ([] if c.endswith("<eoc>") else [MOSS_EOM]))
             for t, c in script]
    model = ForcedModel(Script(pairs, _babble(tokenizer)), tokenizer_path=tok_dir)
    # the second reply repeats the first turn's words: drafts come from across the turn boundary
    model.rule.pairs.append((np.asarray(tokenizer.encode("<|Results|>:\nNone\n<eor>\n<|MOSS|>:"), np.int32).tobytes(),
                             tokenizer.encode(" The result of 2+3 is 5. Again: the result of 2+3 is 5. Once more: the "
                                              "result of 2+3 is 5.") + [MOSS_EOM]))
    runs = {}
    for lookup in ("off", K):
        chat = Chat(model, plugins=["calculator"], do_sample=False, lookup=lookup, max_new_tokens=120, max_len=900)
        model.passes.clear()
        replies = [chat.send("What is 2+3? Say the answer twice."), chat.send("And again, please.")]
        runs[lookup] = ([(r.text, r.results, r.finish_reason, r.generated_tokens) for r in replies], list(chat._ids),
                        visible_ids(chat.session), len(model.passes))
    assert runs[K][:3] == runs["off"][:3]
    replies = runs[K][0]
    assert replies[0][1] is not None and "5" in replies[0][1] and replies[1][0].startswith("The result of 2+3 is 5.")
    assert runs[K][3] < runs["off"][3]
    assert dialogue.prefix(dialogue.MOSS) in tokenizer.decode(runs[K][1], skip_special_tokens=False)
    report(f"chat, 2 plugin turns: {runs[K][3]} forwards with lookup, {runs['off'][3]} without")


def test_a_batch_of_four_rows_that_accept_differently(tokenizer, tok_dir, report):
    """Four slots of one BatchRunner (per-row drafts, per-row acceptance) and a padded batch Session."""
    replies = [REPLY, REPEATED * 2 + " done", " nothing here repeats at all, seven eight nine ten", REPLY[:40]]
    prompts = [PROMPT, "<|Human|>: Echo:" + REPEATED + "<eoh>\n<|MOSS|>:", "<|Human|>: Hi<eoh>\n<|MOSS|>:",
               "<|Human|>: Short:" + REPEATED + "<eoh>\n<|MOSS|>:"]
    pairs = [(tokenizer.encode(p), tokenizer.encode(r) + [MOSS_EOM]) for p, r in zip(prompts, replies)]
    model = ForcedModel(Script(pairs, _babble(tokenizer)), tokenizer_path=tok_dir)
    ids = [tokenizer.encode(p) for p in prompts]
    alone = [_run(model, i, "off")[0] for i in ids]
    assert [tokenizer.decode(a[:-1]) for a in alone] == replies

    runner = BatchRunner(model, 4, max_len=256)
    got: list = [None] * 4
    per_row: list = [None] * 4

    def client(i: int) -> None:
        slot = runner.acquire()
        try:
            stats = LookupStats()
            options = GenerationOptions(do_sample=False, lookup=K, max_new_tokens=200)
            got[i] = [s[0] for s in generate_ids(model, slot, [ids[i]], options, stats=stats)]
            per_row[i] = stats
        finally:
            runner.release(slot)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner.stop()
    assert got == alone
    rates = [s.accepted / max(1, s.drafted) for s in per_row]
    assert len({round(r, 2) for r in rates}) >= 3, rates  # the rows really accept differently
    assert runner.steps < sum(len(a) for a in alone)
    report(f"batch of 4 (BatchRunner): acceptance per row {', '.join(f'{r:.2f}' for r in rates)}; "
           f"{runner.steps} steps for {sum(len(a) for a in alone)} tokens")

    texts = generate(model, prompts, do_sample=False, lookup=K, max_new_tokens=200)
    assert texts == generate(model, prompts, do_sample=False, lookup="off", max_new_tokens=200) == replies


def test_under_a_streaming_budget_a_verify_pass_streams_each_layer_once(tmp_path_factory, report):
    import jmoss
    from jmoss.engine import StreamingWeights
    from jmoss.placement import plan_placement
    from jmoss.store import Store
    from test_engine import SMALL, cached_store

    store = cached_store(SMALL)
    minimum = plan_placement(Store.open(store).config, device="cpu", device_memory=1 << 40,
                             host_memory=None).minimum_device_bytes
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 5, 6, 7, 8]
    # the target repeats the prompt's run with a change every fifth token: partly accepted drafts
    pattern = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]

    def rule(history: tuple[int, ...]) -> int:
        n = len(history)
        token = pattern[n % len(pattern)]
        return token + 100 if n % 5 == 0 else token

    results = {}
    for lookup in ("off", K):
        model = forced(jmoss.load(store, device="cpu", device_memory=minimum + 8 * (1 << 20)), rule)
        assert isinstance(model.weights, StreamingWeights) and model.weights.streamed_groups
        session = model.session(max_len=64)
        stats = LookupStats()
        model.weights.stats.reset()
        options = GenerationOptions(do_sample=False, lookup=lookup, max_new_tokens=40)
        out = [s[0] for s in generate_ids(model, session, [prompt], options, stats=stats)]
        engine = model.weights.stats
        keys = np.stack([k.numpy()[0, :, : session.length] for k in session.cache.keys])
        results[lookup] = (out, stats, engine.forwards, engine.bytes_consumed, keys, model.plan.disk_bytes_per_token)
    plain, ours = results["off"], results[K]
    assert ours[0] == plain[0]
    assert ours[1].verify_passes and ours[1].accepted
    # every forward (prompt, plain decode or verify) streams every layer once
    for out, stats, forwards, consumed, _, per_token in (plain, ours):
        assert forwards == 1 + stats.passes and consumed == forwards * per_token
    assert ours[2] < plain[2]
    np.testing.assert_allclose(ours[4], plain[4], rtol=1e-5, atol=1e-5)
    report(f"streaming budget: {plain[2] - 1} decode forwards plain, {ours[2] - 1} with lookup; "
           f"{ours[5] / 1e6:.2f} MB streamed per forward either way")


# -- sampling -----------------------------------------------------------------------------------


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_verify_draws_from_the_target_distribution(report):
    """Sampler.verify, over many draws and every draft token: the token it returns follows p."""
    logits = np.log(np.array([0.35, 0.25, 0.2, 0.12, 0.08], dtype=np.float32))
    opts = GenerationOptions(do_sample=True, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=11)
    sampler = Sampler(opts, 5)
    probs = np.exp(logits) / np.exp(logits).sum()
    draws = 4000
    worst = 1.0
    for draft in range(5):
        counts = np.bincount([sampler.verify(logits, [], draft) for _ in range(draws)], minlength=5)
        worst = min(worst, _chi_square_p(counts, probs * draws))
    # with top-p 0.8, temperature 0.7, a repetition penalty and presence/frequency penalties: the processed
    # distribution
    opts = GenerationOptions(do_sample=True, seed=12, presence_penalty=0.1, frequency_penalty=0.05)
    sampler = Sampler(opts, 5)
    history, generated = [3, 1, 1], [1, 1]
    scores = sampler.scores(logits, history, generated)
    target = np.exp(scores - scores.max())
    target /= target.sum()
    for draft in (0, 2, 4):  # 4 is outside top-p: always rejected, never returned
        counts = np.bincount([sampler.verify(logits, history, draft, generated) for _ in range(draws)], minlength=5)
        assert counts[target == 0].sum() == 0
        worst = min(worst, _chi_square_p(counts, target * draws))
    report(f"verify vs target, 8 chi-square tests of {draws} draws: smallest p = {worst:.3f}")
    assert worst > 1e-3


def test_sampled_generation_with_lookup_follows_the_target(report):
    """End to end on a 4-token vocabulary: the joint law of three generated tokens (drafted from
    the prompt) equals the model's, by chi-square over 64 cells."""
    table = np.log(np.array([[0.6, 0.2, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25],
                             [0.1, 0.1, 0.2, 0.6]], dtype=np.float32))

    def rule(history: tuple[int, ...]) -> np.ndarray:
        return table[history[-1]]

    model = ForcedModel(rule, vocab_size=4, eos_token_id=None)
    prompt = [0, 1, 2, 3, 0, 1, 3, 3, 0]
    draws = 3000
    counts = np.zeros(64)
    stats = LookupStats()
    session = model.session(max_len=16)
    for seed in range(draws):
        session.reset()
        options = GenerationOptions(do_sample=True, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=seed,
                                    lookup=3, max_new_tokens=3)
        a, b, c = [s[0] for s in generate_ids(model, session, [prompt], options, stats=stats)]
        counts[16 * a + 4 * b + c] += 1
    p = np.exp(table) / np.exp(table).sum(axis=1, keepdims=True)
    expected = np.array([p[0, a] * p[a, b] * p[b, c] for a in range(4) for b in range(4) for c in range(4)]) * draws
    pval = _chi_square_p(counts, expected)
    report(f"sampled 3 tokens x {draws} with lookup ({stats.accepted}/{stats.drafted} drafts accepted): "
           f"chi-square p = {pval:.3f}")
    assert stats.verify_passes > draws // 2 and stats.accepted > 0
    assert pval > 1e-3


# -- the server and the command line --------------------------------------------------------------


def test_the_server_answers_the_same_with_lookup_alone_and_batched(tokenizer, tok_dir, report):
    import httpx

    from jmoss.server import create_app
    from test_web import AppServer

    model = _model(tokenizer, tok_dir, [("<|MOSS|>:", REPLY)])
    ask = "Say it again:" + REPEATED + ", and again:" + REPEATED + "."

    def answers(url: str) -> list:
        with httpx.Client(base_url=url, timeout=120) as http:
            done = http.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 60,
                                                        "temperature": 0}).json()
            chat = http.post("/v1/chat/completions", json={"model": "m", "max_tokens": 60, "temperature": 0,
                                                           "messages": [{"role": "user", "content": ask}]}).json()
            first = http.post("/", json={"prompt": ask, "temperature": 0, "max_length": 600}).json()
            second = http.post("/", json={"prompt": ask, "uid": first["uid"], "temperature": 0,
                                          "max_length": 900}).json()
        return [done["choices"][0]["text"], done["usage"], chat["choices"][0]["message"]["content"],
                chat["choices"][0]["finish_reason"], first["response"], second["response"]]

    got, forwards = {}, {}
    for lookup in ("off", K):
        for batch in (1, 2):
            model.passes.clear()
            server = AppServer(create_app(model, model_name="m", web=False, max_tokens_limit=200, max_batch=batch,
                                          lookup=lookup))
            try:
                got[(lookup, batch)] = answers(server.url)
            finally:
                server.stop()
            forwards[(lookup, batch)] = len(model.passes)
    assert all(v == got[("off", 1)] for v in got.values()), got
    assert got[("off", 1)][0] == REPLY[:len(got[("off", 1)][0])] and got[("off", 1)][4].startswith(REPLY[1:20])
    assert forwards[(K, 1)] < forwards[("off", 1)] and forwards[(K, 2)] < forwards[("off", 2)]
    report(f"server (completion, chat, 2 uid turns): {forwards[('off', 1)]} forwards without lookup, "
           f"{forwards[(K, 1)]} with; --max-batch 2: {forwards[('off', 2)]} / {forwards[(K, 2)]}")


# -- a real (random-weight) model ------------------------------------------------------------------


def test_a_real_random_model_gives_plain_greedy_with_lookup(tok_dir, report):
    from jmoss.api import Model
    from moss_fixtures import tiny_moss
    from torch_reference import state_dict_numpy

    torch_model, config = tiny_moss(seed=1)
    model = Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu", tokenizer_path=tok_dir)
    prompts = ["the cat the cat the cat the cat", "1 2 3 4 1 2 3 4 1 2 3 4 1 2"]
    accepted = 0
    for text in prompts:
        ids = model.tokenizer.encode(text)
        for penalties in ({"repetition_penalty": 1.0}, {"repetition_penalty": 1.02},
                          {"repetition_penalty": 1.0, "presence_penalty": 0.4, "frequency_penalty": 0.6}):
            stats = LookupStats()
            plain = _run(model, ids, "off", max_new_tokens=48, **penalties)
            ours = _run(model, ids, K, max_new_tokens=48, stats=stats, **penalties)
            assert ours[:2] == plain[:2]
            accepted += stats.accepted
    assert accepted > 0  # the model repeats itself, so drafts were really kept
    batch = model.generate(prompts, do_sample=False, max_new_tokens=24, lookup=K, repetition_penalty=1.0)
    assert batch == model.generate(prompts, do_sample=False, max_new_tokens=24, lookup="off", repetition_penalty=1.0)
    report(f"tiny random MOSS: greedy with lookup = without on 2 prompts x 3 penalty sets ({accepted} drafts kept)")
