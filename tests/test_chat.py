"""Multi-turn chat: MOSS's prompt format, KV cache reuse across turns, the context policy."""

from __future__ import annotations

import pytest

from jmoss import dialogue
from jmoss.api import Model
from jmoss.generation import generate_tokens
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_dir):
    torch_model, config = tiny_moss(seed=3)
    tok = moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok"))
    return Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu", tokenizer_path=tok)


def test_prompt_is_mosss_exact_format(model):
    chat = model.chat(do_sample=False, max_new_tokens=8)
    reply = chat.send("你好")
    expected_start = dialogue.base_meta_instruction() + "<|Human|>: 你好<eoh>\n<|MOSS|>:"
    text = model.tokenizer.decode(chat._ids, skip_special_tokens=False)
    assert text.startswith(expected_start)
    assert text.endswith("<eom>\n")
    assert reply.text and reply.generated_tokens == 8 and reply.finish_reason == "length"


def test_second_turn_prefills_only_its_own_tokens(model, report):
    chat = model.chat(do_sample=False, max_new_tokens=10)
    first = chat.send("Hello MOSS, how are you?")
    before = chat.token_count
    second = chat.send("Tell me about Fudan University.")
    own = model.tokenizer.encode(dialogue.human("Tell me about Fudan University.") + "<|MOSS|>:")
    # the previous reply's last sampled token + "<eom>\n" closing it, then this turn's prompt
    closing = before - (first.prefilled_tokens + first.generated_tokens - 1)
    assert first.prefilled_tokens == len(model.tokenizer.encode(dialogue.base_meta_instruction())) + len(
        model.tokenizer.encode(dialogue.human("Hello MOSS, how are you?") + "<|MOSS|>:"))
    assert second.prefilled_tokens == closing + len(own)
    report(f"turn 1 prefilled {first.prefilled_tokens} tokens, turn 2 prefilled {second.prefilled_tokens} "
           f"(its own {len(own)} + {closing} closing the previous reply) of {chat.token_count} in the conversation")


def test_kv_reuse_gives_the_same_reply_as_recomputing_the_whole_conversation(model):
    chat = model.chat(do_sample=False, max_new_tokens=12, repetition_penalty=1.0)
    chat.send("What is 2 + 2?")
    chat.send("And 3 + 3?")
    prompt = list(chat._ids)
    prompt_turn3 = prompt + model.tokenizer.encode(dialogue.human("Thanks!") + "<|MOSS|>:")
    reply = chat.send("Thanks!")
    fresh = generate_tokens(model, prompt_turn3, do_sample=False, max_new_tokens=12, repetition_penalty=1.0)
    assert model.tokenizer.decode(fresh, skip_special_tokens=True).lstrip(" ") == reply.text


def test_a_long_conversation_never_errors_on_the_context_limit(model, report):
    chat = model.chat(do_sample=True, seed=0, max_new_tokens=60, max_len=512)
    notices = []
    for i in range(12):
        reply = chat.send(f"This is message number {i}; please answer at length.")
        notices += reply.notices
        assert chat.token_count <= 512
    assert any("dropped" in n for n in notices)
    assert chat._ids[: len(chat._meta_ids)] == chat._meta_ids
    report(f"12 turns in a 512-position window: {len(notices)} notices, e.g. {notices[0]!r}")


def _message_leaving(chat, room: int) -> str:
    """A user message after which ``room`` of the chat's positions are left for the reply."""
    tokenizer, used = chat.tokenizer, len(chat._meta_ids)
    words = 1
    while used + len(tokenizer.encode(dialogue.human("go " * words) + "<|MOSS|>:")) < chat.max_len - room:
        words += 1
    return "go " * words


def test_a_reply_that_ends_by_context_leaves_the_conversation_within_the_positions(model):
    """The reply fills the positions it has; its closing "<eom>\n" must fit too (main: 514 of 512)."""
    chat = model.chat(do_sample=True, seed=1, max_new_tokens=4096, max_len=512, repetition_penalty=1.0)
    message = _message_leaving(chat, 24)
    for turn in range(3):  # later turns drop the earlier ones, then fill the context again
        reply = chat.send(message)
        assert reply.finish_reason == "context", (turn, reply.finish_reason)
        assert chat.token_count <= 512, (turn, chat.token_count)
        assert chat.session.length <= chat.token_count
        assert model.tokenizer.decode(chat._ids, skip_special_tokens=False).endswith("<eom>\n")


def test_a_plugin_turn_whose_first_pass_fills_the_context_stays_within_the_positions(model):
    from jmoss.errors import ContextLengthError

    chat = model.chat(plugins=["calculator"], do_sample=True, seed=2, max_new_tokens=4096, max_len=512,
                      repetition_penalty=1.0)
    message = _message_leaving(chat, 24)
    for _ in range(2):
        try:
            chat.send(message)
        except ContextLengthError:
            pass  # the Results and a reply cannot fit after pass 1: the turn is taken back
        assert chat.token_count <= 512


def test_clear_starts_over_with_the_meta_instruction(model):
    chat = model.chat(do_sample=False, max_new_tokens=4)
    chat.send("one")
    chat.clear()
    assert chat._ids == chat._meta_ids and chat.history == [] and chat.session.length == 0
    assert chat.send("two").prefilled_tokens == len(chat._meta_ids) + len(
        model.tokenizer.encode(dialogue.human("two") + "<|MOSS|>:"))


def test_an_interrupted_reply_keeps_the_session_usable(model):
    chat = model.chat(do_sample=False, max_new_tokens=30)
    stream = chat.stream("Interrupt me")
    next(stream)
    stream.close()  # what Ctrl-C in the CLI does
    assert chat.last_reply.finish_reason == "interrupted"
    assert model.tokenizer.decode(chat._ids, skip_special_tokens=False).endswith("<eom>\n")
    assert chat.send("Still there?").text is not None


def test_a_chat_runs_on_the_callers_session_and_a_cancel_closes_the_turn(model):
    from jmoss.chat import Chat

    session = model.session(max_len=512)
    chat = Chat(model, session=session, do_sample=False, max_new_tokens=30)
    assert chat.session is session and chat.max_len == 512
    deltas: list[str] = []
    for delta in chat.stream("Interrupt me", should_stop=lambda: len(deltas) >= 2):
        deltas.append(delta)
    reply = chat.last_reply
    assert reply.finish_reason == "cancelled" and reply.text == "".join(deltas).lstrip(" ")
    assert 0 < reply.generated_tokens < 30 and session.length > len(chat._meta_ids)
    assert model.tokenizer.decode(chat._ids, skip_special_tokens=False).endswith("<eom>\n")
    # a turn on another session (a slot leased for it): the chat's own session is back afterwards
    other = model.session(max_len=512)
    assert chat.send("Still there?", session=other).finish_reason in ("stop", "length")
    assert chat.session is session and other.length > 0
    assert [q for q, _ in chat.history] == ["Interrupt me", "Still there?"]
