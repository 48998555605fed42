"""The jmoss command line: driven as a user would, in a pseudo-terminal where it is interactive."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

import jmoss
from jmoss import layout
from jmoss.store import write_store_from_groups
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy

JMOSS = [sys.executable, "-m", "jmoss.cli"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_dir):
    torch_model, config = tiny_moss(seed=11)
    root = tmp_path_factory.mktemp("cli")
    groups = layout.split_state_dict(state_dict_numpy(torch_model), config)
    return write_store_from_groups(root / "store", config, groups, tokenizer_dir=moss_tokenizer_dir(shared_dir, root / "tok"))


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*JMOSS, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_help_and_version():
    out = run("--help")
    assert out.returncode == 0
    for command in ("convert", "verify", "info", "generate", "chat", "demo", "doctor"):
        assert command in out.stdout
    assert run("--version").stdout.strip() == f"jmoss, version {jmoss.__version__}"
    assert "--device-memory" in run("chat", "--help").stdout


def test_generate_prints_only_the_generated_text(store):
    out = run("generate", str(store), "<|Human|>: Hi<eoh>\n<|MOSS|>:", "--greedy", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    expected = jmoss.load(store, device="cpu").generate("<|Human|>: Hi<eoh>\n<|MOSS|>:", do_sample=False, max_new_tokens=12)
    assert out.stdout == expected + "\n"


def test_generate_with_lookup_prints_the_same_greedy_text(store):
    out = run("generate", str(store), "1 2 3 1 2 3 1 2", "--greedy", "--max-new-tokens", "12", "--lookup", "4")
    assert out.returncode == 0, out.stderr
    expected = jmoss.load(store, device="cpu").generate("1 2 3 1 2 3 1 2", do_sample=False, max_new_tokens=12,
                                                         lookup="off")
    assert out.stdout == expected + "\n"


def test_unconverted_hub_name_offers_the_convert_command():
    out = run("generate", "fnlp/some-model-not-converted", "hi")
    assert out.returncode == 1
    assert "jmoss convert fnlp/some-model-not-converted" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["chat", "x", "--device-memory", "lots"], ["generate", "x", "y", "--top-p", "2"],
                                  ["chat", "x", "--device", "tpu"], ["generate", "x", "y", "--lookup", "fast"],
                                  ["serve", "x", "--lookup", "99"]])
def test_bad_flags_are_usage_errors(args):
    out = run(*args)
    assert out.returncode == 2 and "Usage:" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")  # worded as jmoss's own errors
    assert "Error:" not in out.stderr


# -- one flag vocabulary (issue #30, finding 7) ------------------------------------------------------


@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_every_command_that_runs_a_model_takes_the_same_flags(command):
    shown = run(command, "--help").stdout
    shown = " ".join(shown.split())
    for flag in ("-n, --max-new-tokens", "-t, --threads", "-c, --ctx-size", "--device [auto|cpu|cuda]", "--pull"):
        assert flag in shown, (command, flag)
    assert "[default: 256" in shown.split("--max-new-tokens", 1)[1][:200]
    if command != "generate":
        assert "--system TEXT" in shown


def test_demo_and_bench_share_the_vocabulary_and_the_device_default():
    demo, bench = (" ".join(run(c, "--help").stdout.split()) for c in ("demo", "bench"))
    assert "-n, --max-new-tokens" in demo and "-t, --threads" in demo
    assert "--device [auto|cpu|cuda]" in bench and "[default: auto]" in bench.split("--device", 1)[1][:200]
    assert "-t, --threads" in bench
    assert "--max_len" in open(os.path.join(os.path.dirname(__file__), "..", "demos", "cli_demo_jittor.py")).read()
    assert "--max-new-tokens" in subprocess.run([sys.executable, "demos/cli_demo_jittor.py", "--help"],
                                                capture_output=True, text=True, timeout=120,
                                                cwd=os.path.join(os.path.dirname(__file__), "..")).stdout


def test_short_flags_generate_as_the_long_ones(store):
    prompt = "<|Human|>: Hi<eoh>\n<|MOSS|>:"
    short = run("generate", str(store), prompt, "--greedy", "-n", "5", "-t", "1", "-c", "64", "-q")
    assert short.returncode == 0, short.stderr
    long = run("generate", str(store), prompt, "--greedy", "--max-new-tokens", "5", "--threads", "1",
               "--ctx-size", "64")
    assert short.stdout == long.stdout and len(short.stdout) > 1
    expected = jmoss.load(store, device="cpu").generate(prompt, do_sample=False, max_new_tokens=5)
    assert short.stdout == expected + "\n"


def test_ctx_size_bounds_the_context_it_plans_for(store):
    out = run("generate", str(store), "hello " * 40, "-c", "16", "-n", "4")
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_info_prints_the_plan_for_the_real_moss_config(shared_dir):
    out = run("info", str(shared_dir / "assets/moss-moon-003-sft/config.json"), "--device", "cuda",
              "--device-memory", "12GiB", "--host-memory", "64GiB")
    assert out.returncode == 0, out.stderr
    assert "34 layers" in out.stdout and "layers 0-7" in out.stdout and "streamed per token" in out.stdout


INFO_PROBE = """
import sys
from jmoss.cli import main
from jmoss.jittor_setup import resolve_device
print("RESOLVED", resolve_device("auto"))
try:
    main(["info", sys.argv[1]])
except SystemExit as exc:
    assert not exc.code, exc.code
assert "jittor" not in sys.modules, "jmoss info imported jittor"
"""


def test_info_defaults_to_the_device_chat_uses_and_plans_without_a_budget(shared_dir):
    """Same `auto` as chat, resolved without importing jittor; no budget reads as such (no 1 PiB)."""
    config = shared_dir / "assets/moss-moon-003-sft/config.json"
    proc = subprocess.run([sys.executable, "-c", INFO_PROBE, str(config)], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    resolved = proc.stdout.split("RESOLVED ", 1)[1].split()[0]
    assert f"placement plan: device {resolved}, device budget none (all resident)" in proc.stdout
    assert "TiB" not in proc.stdout and "unallocated" not in proc.stdout
    assert "layers 0-33" in proc.stdout and "device memory:" in proc.stdout
    assert "--device [auto|cpu|cuda]" in run("info", "--help").stdout


@pytest.mark.parametrize("command", [["chat"], ["generate"], ["info"]])
def test_a_missing_path_is_named_as_missing(tmp_path, command):
    missing = tmp_path / "no-such-store"
    out = run(*command, str(missing), *(["hi"] if command == ["generate"] else []))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {missing} does not exist; give the folder of a converted jmoss store (made by "
        "`jmoss convert <hf-repo-or-checkpoint-dir> --out DIR`) or a converted model name such as "
        "fnlp/moss-moon-003-sft"]


def test_load_of_a_missing_path_says_so_and_names_still_resolve(tmp_path):
    from jmoss.errors import ModelNotFoundError

    for missing in ("/nonexistent", "./nope", "~/no-such-jmoss-store", "a/b/c", tmp_path / "x"):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            jmoss.load(missing)
    with pytest.raises(ModelNotFoundError, match="jmoss convert fnlp/moss-moon-003-sft"):
        jmoss.load("fnlp/moss-moon-003-sft")  # a repo id: the name lookup, not "does not exist"


def test_demo_says_where_its_store_is_and_how_to_keep_it(tmp_path, monkeypatch):
    from jmoss.demo import run_demo

    small = dict(n_embd=128, n_head=4, rotary_dim=8, n_layer=2, n_positions=256)
    kept: list[str] = []
    figures = run_demo(tmp_path / "work", max_new_tokens=2, echo=kept.append, write=lambda s: None, shape=small)
    assert figures["store"] == tmp_path / "work" / "store" and (figures["store"] / "jmoss.json").is_file()
    assert f"   working in {tmp_path / 'work'}: the checkpoint and store are kept there" in kept
    assert kept[-1].startswith(f"the store is kept at {figures['store']}")

    # without --workdir the store becomes the model "demo", for the next command (issue #30, finding 5)
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path / "home"))
    for _ in range(2):  # a second demo replaces the first one's store
        temporary: list[str] = []
        figures = run_demo(None, max_new_tokens=2, echo=temporary.append, write=lambda s: None, shape=small)
        assert figures["store"] == tmp_path / "home" / "models" / "demo" and (figures["store"] / "jmoss.json").is_file()
        assert "`jmoss chat demo`" in temporary[-1] and "`jmoss rm demo`" in temporary[-1]
    assert jmoss.load("demo", device="cpu").path == figures["store"]


def test_chat_in_a_terminal_answers_clears_interrupts_and_stops(store):
    child = pexpect.spawn(JMOSS[0], [*JMOSS[1:], "chat", str(store), "--greedy", "--max-new-tokens", "6"],
                          encoding="utf-8", timeout=240, env=os.environ.copy(), dimensions=(40, 200))
    child.expect("Welcome to MOSS")
    child.expect_exact("<|Human|>: ")
    child.sendline("你好")
    child.expect_exact("<|MOSS|>: ")
    child.expect_exact("<|Human|>: ")  # the reply ended and the next prompt came

    child.sendline("clear")
    child.expect("Welcome to MOSS")
    child.expect_exact("<|Human|>: ")
    child.sendline("Tell me something")
    child.expect_exact("<|MOSS|>: ")
    child.expect_exact("<|Human|>: ")

    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_session(store):
    child = pexpect.spawn(JMOSS[0], [*JMOSS[1:], "chat", str(store), "--max-new-tokens", "100000", "--seed", "1"],
                          encoding="utf-8", timeout=240, env=os.environ.copy(), dimensions=(40, 200))
    child.expect_exact("<|Human|>: ")
    child.sendline("Write a very long story")
    child.expect_exact("<|MOSS|>: ")
    child.expect(r"\S")  # some reply text is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("<|Human|>: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_convert_and_verify_from_the_command_line(tmp_path):
    from jmoss.demo import build_checkpoint

    source = tmp_path / "ckpt"
    source.mkdir()
    build_checkpoint(source, shape=dict(n_embd=128, n_head=4, rotary_dim=8, n_layer=4, n_positions=256))
    out = run("convert", str(source), "--out", str(tmp_path / "store"), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert run("verify", str(tmp_path / "store")).returncode == 0
    layer = tmp_path / "store" / "layer_003.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    bad = run("verify", str(tmp_path / "store"))
    assert bad.returncode == 1 and "layer_003.safetensors" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_is_recognised_when_native_code_wraps_it():
    """A Ctrl-C landing inside jittor's C++ or the Rust tokenizer comes back wrapped; chat still stops."""
    from jmoss.chat_cli import _is_interrupt

    class PanicException(BaseException):  # pyo3's type, as the tokenizer raises it
        pass

    assert _is_interrupt(KeyboardInterrupt())
    assert _is_interrupt(RuntimeError("Wrong inputs ... KeyboardInterrupt: ..."))
    assert _is_interrupt(PanicException("Failed to access NumPy array API capsule: PyErr { type: "
                                        "<class 'KeyboardInterrupt'> ... }"))
    assert not _is_interrupt(RuntimeError("jittor out of memory"))
    assert not _is_interrupt(PanicException("index out of bounds"))
    assert not _is_interrupt(ValueError("KeyboardInterrupt"))
