"""MOSS's two-pass plugin loop inside Chat.send, end to end.

First with a scripted model at the model boundary: the real tokenizer, dialogue format, command
parser and plugins, but logits that put all mass on tokens the test chose, so the conversation the
loop builds can be checked byte for byte. Then with a real random model, whose arbitrary output
must never crash the loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from jmoss import dialogue
from jmoss.api import Model
from jmoss.config import MossConfig
from jmoss.tokenizer import load_tokenizer
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy


class ScriptedSession:
    """Session-shaped stand-in whose next-token logits follow a script; records what it was fed."""

    def __init__(self, script: list[int], vocab: int, max_len: int):
        self.script, self.vocab, self.max_len = script, vocab, max_len
        self.fed: list[int] = []
        self.length = 0

    @property
    def room(self) -> int:
        return self.max_len - self.length

    def reset(self) -> None:
        self.fed, self.length = [], 0

    def _next(self) -> np.ndarray:
        logits = np.zeros((1, self.vocab), dtype=np.float32)
        logits[0, self.script.pop(0)] = 1e4
        return logits

    def prefill(self, rows, last_only: bool = True) -> np.ndarray:
        self.fed += list(rows[0])
        self.length += len(rows[0])
        return self._next()

    def decode(self, tokens) -> np.ndarray:
        self.fed += [int(tokens[0])]
        self.length += 1
        return self._next()


class ScriptedModel:
    """Model-shaped stand-in: real tokenizer and config, scripted logits."""

    def __init__(self, tokenizer, script_texts: list[str]):
        self.tokenizer = tokenizer
        self.config = MossConfig(vocab_size=107008, n_positions=2048, n_embd=64, n_layer=1, n_head=4, rotary_dim=8)
        script = [t for text in script_texts for t in tokenizer.encode(text)]
        self.sessions: list[ScriptedSession] = []
        self._script = script

    def session(self, batch: int = 1, max_len: int | None = None) -> ScriptedSession:
        s = ScriptedSession(self._script, self.config.vocab_size, max_len or self.config.n_positions)
        self.sessions.append(s)
        return s


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_dir):
    return load_tokenizer(moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok")))


def test_two_pass_loop_builds_mosss_training_format_exactly(tokenizer):
    pass1 = '<|Inner Thoughts|>: 需要计算一下<eot>\n<|Commands|>: Calculate("2+3*4"), Solve("x+y=10;x-y=2")<eoc>'
    pass2 = " 2+3*4 = 14<sup><|1|></sup>，x = 6，y = 4。<eom>"
    model = ScriptedModel(tokenizer, [pass1, pass2])
    events = []
    chat = Chat_(model, events)
    reply = chat.send("算一下 2+3*4，再解方程组", do_sample=False, repetition_penalty=1.0)

    assert reply.inner_thoughts == "需要计算一下"
    assert [(c.name, c.args) for c in reply.commands] == [("Calculate", ("2+3*4",)), ("Solve", ("x+y=10;x-y=2",))]
    assert reply.results == "<|Results|>:\nCalculate(\"2+3*4\") => '14'\nSolve(\"x+y=10;x-y=2\") =>\nx = 6\ny = 4\n<eor>\n"
    assert reply.text == "2+3*4 = 14<sup><|1|></sup>，x = 6，y = 4。"
    expected = (chat.meta_instruction + "<|Human|>: 算一下 2+3*4，再解方程组<eoh>\n" + pass1 + "\n"
                + reply.results + "<|MOSS|>:" + pass2 + "\n")
    conversation = tokenizer.decode(chat._ids, skip_special_tokens=False)
    assert conversation == expected
    parsed = dialogue.parse(conversation)
    assert dialogue.render(parsed) == conversation
    turn = parsed.turns[0]
    assert turn.commands is not None and "Calculate" in turn.commands
    # one session, no re-prefill: pass 2 continued the cache (the model saw every id exactly once)
    session = model.sessions[0]
    assert session.fed == chat._ids[: len(session.fed)] and len(session.fed) == len(chat._ids) - 2
    assert [kind for kind, _ in events] == ["thoughts", "commands", "results"]
    assert "- Calculator: enabled. API: Calculate(expression)" in chat.meta_instruction


def test_none_command_gives_none_results_and_a_reply(tokenizer):
    model = ScriptedModel(tokenizer, ["<|Inner Thoughts|>: 不需要工具<eot>\n<|Commands|>: None<eoc>", " 你好！<eom>"])
    chat = Chat_(model, [])
    reply = chat.send("你好", do_sample=False)
    assert reply.commands == [] and reply.results == "<|Results|>:\nNone\n<eor>\n" and reply.text == "你好！"


def test_a_cancel_during_the_commands_pass_runs_no_tool_and_closes_the_turn(tokenizer):
    pass1 = '<|Inner Thoughts|>: 需要计算一下<eot>\n<|Commands|>: Calculate("2+3*4")<eoc>'
    model = ScriptedModel(tokenizer, [pass1])
    events: list = []
    chat = Chat_(model, events)
    session = model.sessions[0]
    asked = len(chat._meta_ids) + len(tokenizer.encode(dialogue.human("算一下")))
    reply = chat.send("算一下", do_sample=False, should_stop=lambda: session.length >= asked + 3)
    assert reply.finish_reason == "cancelled" and reply.generated_tokens == 4  # at most one step after the cancel
    assert reply.commands == [] and reply.results is None
    assert events == []  # neither thoughts nor commands were reported, no call ran
    assert tokenizer.decode(chat._ids, skip_special_tokens=False).endswith("<eom>\n")
    session.script[:] = tokenizer.encode("<|MOSS|>: 好的<eom>")
    assert chat.send("还在吗", do_sample=False).text == "好的"


def test_model_answering_without_tools_is_kept_as_the_reply(tokenizer):
    model = ScriptedModel(tokenizer, ["<|MOSS|>: 直接回答。<eom>"])
    reply = Chat_(model, []).send("hi", do_sample=False)
    assert reply.text == "直接回答。" and reply.commands == [] and reply.results is None


def test_malformed_commands_become_result_text_not_a_crash(tokenizer):
    pass1 = '<|Inner Thoughts|>: x<eot>\n<|Commands|>: Calculate("1/0"), Calculate("(2+"), Frobnicate("z")<eoc>'
    model = ScriptedModel(tokenizer, [pass1, " 算不出来。<eom>"])
    reply = Chat_(model, []).send("1/0?", do_sample=False)
    assert "Calculate(\"1/0\") => 'No result.'" in reply.results
    assert reply.text == "算不出来。"


def Chat_(model, events):
    from jmoss.chat import Chat

    return Chat(model, plugins=["calculator", "solver"], on_event=lambda k, t: events.append((k, t)), max_new_tokens=200)


def test_random_model_output_never_crashes_the_loop(tmp_path, shared_dir):
    torch_model, config = tiny_moss(seed=5)
    tok = moss_tokenizer_dir(shared_dir, tmp_path / "tok")
    model = Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu", tokenizer_path=tok)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fudan.txt").write_text("Fudan University is a university in Shanghai, founded in 1905.")
    chat = model.chat(plugins=["calculator", "solver", "search"], plugin_options={"search": {"folder": docs}},
                      max_new_tokens=24, max_len=1024, plugin_timeout=5.0)
    for seed in range(4):
        reply = chat.send(f"Question {seed}: what is 2+2, and where is Fudan?", seed=seed, temperature=1.5, top_p=1.0)
        assert isinstance(reply.text, str)
    assert len(chat.history) == 4
