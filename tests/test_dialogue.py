"""jmoss.dialogue against MOSS's plugin SFT data: exact parse/render round trip and meta instruction."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED

from jmoss import dialogue
from jmoss.errors import DialogueError

REFERENCE = SHARED / "reference"
CONVERSATIONS = [json.loads(line) for line in (REFERENCE / "moss_plugin_conversations.jsonl").open(encoding="utf-8")]


def _prompt(record: dict) -> str:
    return record["meta_instruction"] + "".join("".join(turn.values()) for turn in record["chat"].values())


def test_fixture_has_all_246_conversations():
    assert len(CONVERSATIONS) == 246


@pytest.mark.parametrize("record", CONVERSATIONS, ids=lambda r: r["source"].rsplit("/", 1)[-1])
def test_every_conversation_parses_and_renders_byte_exact(record):
    text = _prompt(record)
    conv = dialogue.parse(text)
    assert dialogue.render(conv) == text
    assert conv.meta_instruction == record["meta_instruction"]
    assert len(conv.turns) == record["num_turns"]
    # Field by field, each rendered field is the record's field string.
    for turn, fields in zip(conv.turns, record["chat"].values()):
        assert turn.fields() == list(fields.values())


def test_turn_values_are_the_text_inside_the_markers():
    record = next(r for r in CONVERSATIONS if r["source"].endswith("/calculator_plugin_conversation_15.json"))
    turn = dialogue.from_sft_record(record).turns[0]
    assert turn.commands == 'Calculate("60*0.85")'
    assert turn.results == "Calculate(\"60*0.85\") => '51.0'"
    assert not turn.results_inline


def test_text2img_results_are_the_inline_one_liner_and_two_space_reply_survives():
    record = next(r for r in CONVERSATIONS if "text2img" in r["source"]
                  and "  Well" in r["chat"]["turn_1"]["MOSS"])
    turn = dialogue.from_sft_record(record).turns[0]
    assert turn.results_inline and turn.results == "Image generated successfully."
    assert turn.moss.startswith(" Well, here is the generated image.")
    assert turn.render() == "".join(record["chat"]["turn_1"].values())


FOLDER_SWITCHES = {
    "calculator": [{"Calculate"}],
    "equation_solver": [{"Solve"}],
    "web_search": [{"Search"}],
    "text2img": [{"Text2Image"}],
    "mix": [{"Search", "Calculate"}, {"Calculate", "Solve"}],
}


def test_meta_instruction_rebuilds_every_fixture_meta_from_its_folder_tools():
    for record in CONVERSATIONS:
        folder = record["source"].split("/")[-2]
        built = [dialogue.meta_instruction(tools) for tools in FOLDER_SWITCHES[folder]]
        assert record["meta_instruction"] in built, record["source"]


def test_base_meta_instruction_is_moss_text_byte_for_byte():
    base = dialogue.base_meta_instruction()
    assert base == (REFERENCE / "meta_instruction.txt").read_text(encoding="utf-8")
    assert len(base.encode("utf-8")) == 1029
    assert "mutiple" in base and "English and 中文" in base
    assert base.endswith("Capabilities and tools that MOSS can possess.\n")


def test_switch_lines_accept_command_or_capability_names_and_keep_order():
    lines = dialogue.switch_lines(["web search", "Calculate"])
    assert lines == (
        "- Inner thoughts: enabled.\n- Web search: enabled. API: Search(query)\n"
        "- Calculator: enabled. API: Calculate(expression)\n- Equation solver: disabled.\n"
        "- Text-to-image: disabled.\n- Image edition: disabled.\n- Text-to-speech: disabled.\n"
    )
    assert dialogue.switch_lines([], inner_thoughts=False).startswith("- Inner thoughts: disabled.\n")
    with pytest.raises(DialogueError):
        dialogue.switch_lines(["Teleport"])
    with pytest.raises(DialogueError):
        dialogue.switch_lines(["Image edition"])


def test_field_helpers_write_the_training_strings():
    assert dialogue.human("你好") == "<|Human|>: 你好<eoh>\n"
    assert dialogue.inner_thoughts("想") == "<|Inner Thoughts|>: 想<eot>\n"
    assert dialogue.commands("None") == "<|Commands|>: None<eoc>\n"
    assert dialogue.results("None") == "<|Results|>:\nNone\n<eor>\n"
    assert dialogue.results_inline("None") == "<|Results|>: None<eor>\n"
    assert dialogue.moss("好的") == "<|MOSS|>: 好的<eom>\n"
    assert dialogue.prefix(dialogue.MOSS) == "<|MOSS|>:" and dialogue.end_marker(dialogue.COMMANDS) == "<eoc>"


def test_partial_prompt_awaiting_the_model_round_trips():
    text = dialogue.meta_instruction(["Search"]) + dialogue.human("q")
    conv = dialogue.parse(text)
    assert conv.turns[0].human == "q" and conv.turns[0].inner_thoughts is None
    assert dialogue.render(conv) == text


def test_non_plugin_placeholder_results_round_trip():
    text = "meta\n<|Human|>: hi<eoh>\n<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>: hello<eom>\n"
    conv = dialogue.parse(text)
    assert conv.turns[0].results_inline and conv.turns[0].results == "None"
    assert dialogue.render(conv) == text


def test_text_without_turns_is_all_meta():
    assert dialogue.parse("just a meta\n") == dialogue.Conversation("just a meta\n", [])


@pytest.mark.parametrize(
    "bad",
    [
        "m<|Human|>: no end marker",
        "m<|Human|>: q<eoh>",  # marker without its newline
        "m<|Human|>:q<eoh>\n",  # no space after the colon
        "m<|Human|>: q<eoh>\n<|MOSS|>: a<eom>\n<|Commands|>: None<eoc>\n",  # out of order
        "m<|Human|>: q<eoh>\ngarbage",
    ],
)
def test_malformed_text_is_refused_with_dialogue_error(bad):
    with pytest.raises(DialogueError):
        dialogue.parse(bad)
