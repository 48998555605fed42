"""`jmoss bench --compare ctranslate2`: the missing-package error, the exported checkpoint CTranslate2
converts, and the interleaved rounds / medians / table, driven by a fake runner (ctranslate2 is
bench-time only and not a test dependency)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fixtures_checkpoints import save_torch_shards, tiny_model
from jmoss import bench_quant
from jmoss.cli import main
from jmoss.converters.convert import convert
from jmoss.errors import JmossError


@pytest.fixture
def no_ctranslate2(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else real(name, *a))


def test_missing_ctranslate2_is_one_error_saying_how_to_install_it(no_ctranslate2, tmp_path: Path) -> None:
    with pytest.raises(JmossError, match=r"needs ctranslate2: pip install ctranslate2==4\.8\.5"):
        bench_quant.require_ctranslate2()
    store = convert(str(save_torch_shards(tiny_model(), tmp_path / "src")), tmp_path / "store", progress=False)
    result = CliRunner().invoke(main, ["bench", str(store), "--compare", "ctranslate2"])
    assert result.exit_code == 1
    assert "error: --compare ctranslate2 needs ctranslate2: pip install ctranslate2==4.8.5" in result.output
    for args, message in ((["--device", "cuda"], "use --device cpu"), (["--device-memory", "1GiB"], "resident"),
                          (["--compare", "torch"], "runs on its own")):
        result = CliRunner().invoke(main, ["bench", str(store), "--compare", "ctranslate2", *args])
        assert result.exit_code != 0 and message in result.output, result.output
    for args, message in ((["--rounds", "5"], "--rounds applies to --compare ctranslate2"),
                          (["--rounds", "0"], "0 is not in the range x>=1")):
        result = CliRunner().invoke(main, ["bench", str(store), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_exported_checkpoint_is_the_stores_weights_for_transformers(tmp_path: Path) -> None:
    """What CTranslate2's converter reads: transformers loads it and computes the source model's logits."""
    from transformers import CodeGenForCausalLM

    model = tiny_model(seed=4)
    src = save_torch_shards(model, tmp_path / "src")
    store = convert(str(src), tmp_path / "store", progress=False)
    hf = bench_quant.export_hf_checkpoint(store, tmp_path / "hf")
    assert (hf / "vocab.json").is_file() and (hf / "merges.txt").is_file()
    back = CodeGenForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, 300, size=(1, 10)))
    with torch.no_grad():
        np.testing.assert_array_equal(back(ids).logits.numpy(), model(ids).logits.numpy())
    packed = convert(str(src), tmp_path / "int8", progress=False, quantize="int8")
    with pytest.raises(JmossError, match="starts from an fp16 store"):
        bench_quant.export_hf_checkpoint(packed, tmp_path / "hf2")


def test_rounds_are_interleaved_medians_kept_and_a_crashed_run_left_out() -> None:
    calls = []
    rates = {"jmoss fp16": (60, 12), "jmoss int8": (50, 18), "jmoss int4": (55, 24),
             "ct2 float32": (20, 2), "ct2 int8": (300, 15), "ct2 int8_float32": (350, 20)}

    def fake(label, kind, what, path, options):
        calls.append((label, path.name))
        n = sum(1 for c in calls if c[0] == label)
        if label == "ct2 int8" and n == 2:
            return {}  # a crashed run: reported by the runner, left out of the median
        pre, dec = rates[label]
        return {"prefill_tok_s": pre * n, "decode_tok_s": dec * n, "bytes_per_token": 100e6 if "int4" in label else 300e6,
                "peak_rss": 1 << 30}

    paths = {name: Path(name.replace(" ", "-")) for name in
             ("jmoss fp16", "jmoss int8", "jmoss int4", "ct2 float32", "ct2 int8")}
    lines = []
    runs = bench_quant.run_rounds(paths, {}, fake, rounds=3, log=lines.append)
    labels = [label for label, _, _ in bench_quant.CONFIGS]
    assert [c[0] for c in calls] == labels * 3  # one of each per round, in the same order
    assert dict(calls)["ct2 int8_float32"] == "ct2-int8"  # the int8 model, run with float32 activations
    assert len(lines) == 17 and lines[0].startswith("round 1 jmoss fp16: prefill 60.0 tok/s, decode 12.00")
    rows = bench_quant.summarize(runs)
    by = {r["name"]: r for r in rows}
    assert by["jmoss int4"]["decode_tok_s"] == 48 and by["jmoss int4"]["rounds"] == 3  # median of 24, 48, 72
    assert by["ct2 int8"]["rounds"] == 2 and by["ct2 int8"]["decode_tok_s"] == (15 + 45) / 2
    table = bench_quant.format_table({"what": "memory read probe", "gbps": 10.0}, rows)
    assert "best CTranslate2 decode: ct2 int8_float32 40.00 tok/s; best prefill: ct2 int8_float32 700.0 tok/s" in table
    assert "jmoss int4: decode 1.20x, prefill 0.16x CTranslate2's best" in table
    int4 = next(l for l in table.splitlines() if l.startswith("jmoss int4"))
    assert int4.split()[2:] == ["3", "110.0", "48.00", "100.0", "4.80", "48%", "1.0", "GiB"]


def test_int8_activation_rows_run_the_same_stores_with_the_mode_switched_on(monkeypatch) -> None:
    """Where VNNI offers int8 activations, the three jmoss formats run again with
    JMOSS_KERNELS_QUANT_COMPUTE=int8, on the same stores, interleaved in the same rounds."""
    order = bench_quant.configs(int8_activations=True)
    assert [label for label, _, _ in order] == [
        "jmoss fp16", "jmoss int8", "jmoss int4", "jmoss fp16 i8-act", "jmoss int8 i8-act", "jmoss int4 i8-act",
        "ct2 float32", "ct2 int8", "ct2 int8_float32"]
    assert bench_quant.configs() == bench_quant.CONFIGS and len(bench_quant.CONFIGS) == 6
    seen = []
    monkeypatch.setattr(bench_quant, "run_jmoss", lambda path, options, compute="fp32": seen.append((path.name, compute))
                        or {"prefill_tok_s": 1.0, "decode_tok_s": 1.0, "bytes_per_token": 1.0})
    monkeypatch.setattr(bench_quant, "run_ct2", lambda path, what, options: {})
    paths = {name: Path(name.replace(" ", "-")) for name in
             ("jmoss fp16", "jmoss int8", "jmoss int4", "ct2 float32", "ct2 int8")}
    runs = bench_quant.run_rounds(paths, {}, rounds=1, log=lambda line: None, order=order)
    assert seen == [("jmoss-fp16", "fp32"), ("jmoss-int8", "fp32"), ("jmoss-int4", "fp32"),
                    ("jmoss-fp16", "int8"), ("jmoss-int8", "int8"), ("jmoss-int4", "int8")]
    assert len(runs["jmoss int4 i8-act"]) == 1 and runs["ct2 int8"] == []


def test_competitors_run_every_configuration_again_beside_busy_processes(monkeypatch) -> None:
    """--competitors: each round runs the configurations quiet, then again while the benchmark's own
    CPU-bound processes run; the report compares jmoss with CTranslate2's best both ways."""
    import contextlib

    from jmoss import bench

    busy = []

    @contextlib.contextmanager
    def fake_competitors(count=None):
        busy.append(True)
        yield 2
        busy.pop()

    monkeypatch.setattr(bench, "busy_competitors", fake_competitors)
    seen = []

    def fake(label, kind, what, path, options):
        seen.append((label, bool(busy)))
        slow = 0.5 if busy else 1.0
        dec = {"jmoss int4": 40, "ct2 int8": 20}.get(label, 10) * slow * (0.5 if "ct2" in label and busy else 1)
        return {"prefill_tok_s": 100.0, "decode_tok_s": dec, "bytes_per_token": 1e6}

    paths = {name: Path(name) for name in ("jmoss fp16", "jmoss int8", "jmoss int4", "ct2 float32", "ct2 int8")}
    runs = bench_quant.run_rounds(paths, {}, fake, rounds=2, log=lambda line: None, competitors=True)
    labels = [label for label, _, _ in bench_quant.CONFIGS]
    assert seen == ([(label, False) for label in labels] + [(label, True) for label in labels]) * 2
    assert len(runs["jmoss int4 [loaded]"]) == 2 and len(runs["jmoss int4"]) == 2
    table = bench_quant.format_table({"what": "probe", "gbps": 10.0}, bench_quant.summarize(runs))
    assert "jmoss int4: decode 2.00x" in table and "jmoss int4 [loaded]: decode 4.00x" in table
    assert "beside one busy process per CPU: best CTranslate2 decode: ct2 int8 [loaded] 5.00 tok/s" in table
    assert busy == []
    result = CliRunner().invoke(main, ["bench", "nowhere", "--competitors"])
    assert result.exit_code == 2 and "--competitors applies to --compare ctranslate2" in result.output
