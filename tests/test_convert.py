"""converters/convert.py + sources.py: real torch/transformers checkpoints in, a verified store out."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import jmoss
from fixtures_checkpoints import (
    moss_state_dict,
    save_gptq_checkpoint,
    save_safetensors,
    save_sharded_state_dict,
    save_torch_shards,
    state_dict_numpy,
    tiny_model,
    write_config,
    write_tokenizer,
)
from jmoss import store as store_mod
from jmoss import layout
from jmoss.config import MossConfig
from jmoss.converters import convert as convert_mod
from jmoss.converters.convert import convert
from jmoss.errors import CheckpointError, ConfigError, ModelNotFoundError, StoreError, UnsafeCheckpointError
from jmoss.store import JOURNAL, MANIFEST, Store, resolve_model, verify

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def expected(model):
    """The store content the converter must produce: layout.split_state_dict of the torch weights."""
    config = MossConfig.from_dict(model.config.to_dict())
    return config, layout.split_state_dict(state_dict_numpy(model), config, dtype=np.float16)


def assert_store_equals(out: Path, expected) -> None:
    config, groups = expected
    store = Store.open(out)
    assert store.config.n_layer == config.n_layer and store.config.wbits == 32
    for g in layout.all_groups(config):
        arrays = store.group(g)
        assert list(arrays) == list(layout.group_shapes(config, g))  # the store's file order
        assert sorted(arrays) == sorted(groups[g])  # by name: the source's key order is not the store's
        for name in groups[g]:
            assert np.array_equal(arrays[name], groups[g][name]), (g, name)
    verify(out)


def store_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ------------------------------------------------------------------------------ formats


def test_torch_shards_with_index_and_causal_masks_convert_exactly(model, expected, tmp_path: Path) -> None:
    src = save_torch_shards(model, tmp_path / "src", n_shards=3)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    assert any(k.endswith("attn.causal_mask") for k in index["weight_map"])  # as in MOSS's shards
    out = convert(str(src), tmp_path / "out", progress=False)
    assert_store_equals(out, expected)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["format"] == "pytorch" and len(manifest["source"]["files"]) == 3
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes() and name in manifest["files"]
    assert not (out / JOURNAL).exists() and not list(out.glob("*.tmp"))


def test_single_bin_without_index_and_fp32_or_bf16_weights(model, expected, tmp_path: Path) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        src = save_torch_shards(model, tmp_path / f"src-{dtype}", n_shards=1, index=False, dtype=dtype)
        assert not (src / "pytorch_model.bin.index.json").exists()
        out = convert(str(src), tmp_path / f"out-{dtype}", progress=False)
        if dtype == torch.float32:
            assert_store_equals(out, expected)
        else:  # bf16 keeps 8 mantissa bits: the store holds the bf16 values, exactly, in fp16
            config, _ = expected
            bf16 = {k: v.bfloat16().float().numpy() for k, v in model.state_dict().items()}
            assert_store_equals(out, (config, layout.split_state_dict(bf16, config, dtype=np.float16)))


def test_the_store_does_not_depend_on_the_source_key_order(model, tmp_path: Path) -> None:
    # transformers 5.24 changed CodeGen's state-dict order; a store must be the same bytes whatever it is
    sd = moss_state_dict(model)
    names = list(sd)
    shuffled = {str(n): sd[str(n)] for n in np.random.default_rng(0).permutation(names)}
    assert list(shuffled) != names
    outs = []
    for label, state in (("model-order", sd), ("shuffled", shuffled)):
        src = tmp_path / label
        src.mkdir()
        write_config(model, src)
        write_tokenizer(src)
        save_sharded_state_dict(state, src, n_shards=3)
        outs.append(convert(str(src), tmp_path / f"out-{label}", progress=False))
    a, b = (store_bytes(o) for o in outs)
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if k != MANIFEST} == {k: v for k, v in b.items() if k != MANIFEST}
    files = [json.loads(o.joinpath(MANIFEST).read_text())["files"] for o in outs]
    assert files[0] == files[1]
    config = MossConfig.from_dict(model.config.to_dict())
    split = [layout.split_state_dict({k: v.numpy() for k, v in state.items()}, config) for state in (sd, shuffled)]
    for g in layout.all_groups(config):
        assert list(split[0][g]) == list(split[1][g]) == list(layout.group_shapes(config, g))


@pytest.mark.parametrize("shard_size", [None, "60KB"])
def test_save_pretrained_safetensors_convert_exactly(model, expected, tmp_path: Path, shard_size) -> None:
    src = save_safetensors(model, tmp_path / "src", max_shard_size=shard_size)
    assert (src / "model.safetensors.index.json").exists() == (shard_size is not None)
    out = convert(str(src), tmp_path / "out", progress=False)
    assert_store_equals(out, expected)
    assert json.loads((out / MANIFEST).read_text())["source"]["format"] == "safetensors"


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_checkpoints_dequantize_to_the_packed_values(model, tmp_path: Path, bits: int) -> None:
    # config says wbits 4 for the int8 file too (moss-spec §2.6): bits must come from shapes
    src, dequantized = save_gptq_checkpoint(model, tmp_path / "src", bits, groupsize=32, config_wbits=4)
    out = convert(str(src), tmp_path / "out", progress=False, dequantize=True)
    store = Store.open(out)
    config = store.config
    assert config.wbits == 32  # --dequantize: the store is fp16 (packed is the default: test_packed_store.py)
    for hf_name, weight in dequantized.items():
        group, name = layout.map_hf_name(hf_name, config)
        assert np.array_equal(store.group(group)[name], layout.relayout(name, weight, config)), hf_name
    sd = state_dict_numpy(model)  # unquantized tensors pass through unchanged
    for hf_name in ("transformer.wte.weight", "lm_head.weight", "transformer.h.1.mlp.fc_in.bias"):
        group, name = layout.map_hf_name(hf_name, config)
        assert np.array_equal(store.group(group)[name], sd[hf_name].astype(np.float16))
    assert json.loads((out / MANIFEST).read_text())["source"]["quantization"]["bits"] == [bits]


@pytest.mark.parametrize("fmt", ["torch-shards", "safetensors"])
def test_logits_of_the_loaded_store_equal_the_torch_model(model, tmp_path: Path, fmt: str) -> None:
    src = save_torch_shards(model, tmp_path / "src") if fmt == "torch-shards" else save_safetensors(model, tmp_path / "src")
    out = convert(str(src), tmp_path / "out", progress=False)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 19))
    got = jmoss.load(str(out), device="cpu", dtype="float32").logits(ids)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ------------------------------------------------------------------------------ Hugging Face


def _populate_hf_cache(hf_home: Path, repo: str, files_from: Path, commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub keeps under HF_HOME, filled by hand (no network in tests)."""
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_repo_from_the_offline_cache_lands_where_load_finds_it(model, expected, tmp_path: Path, monkeypatch) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _populate_hf_cache(tmp_path / "hf", "fnlp/moss-tiny", src, commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "JMOSS_HOME": str(tmp_path / "home")}
    code = "from jmoss.converters.convert import convert; print(convert('fnlp/moss-tiny', revision=%r, progress=False))"
    for revision in (None, commit):
        run = subprocess.run([sys.executable, "-c", code % revision], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path / "home"))
    out = resolve_model("fnlp/moss-tiny")
    assert out == tmp_path / "home" / "models" / "fnlp--moss-tiny" and run.stdout.strip() == str(out)
    assert_store_equals(out, expected)
    source = json.loads((out / MANIFEST).read_text())["source"]
    assert (source["id"], source["revision"]) == ("fnlp/moss-tiny", commit)


def test_hub_fetches_only_the_files_conversion_needs(model, expected, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    remote = save_safetensors(model, tmp_path / "remote")
    torch.save(model.state_dict(), remote / "pytorch_model.bin")  # the same weights as a pickle
    (remote / "flax_model.msgpack").write_bytes(b"x" * 1000)
    fetched: list[str] = []

    def fake_download(repo_id: str, filename: str, *, revision=None, **kwargs) -> str:
        fetched.append(filename)  # the network boundary: everything past it is the real code
        if not (remote / filename).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(remote / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = convert("org/tiny", tmp_path / "out", progress=False)
    assert_store_equals(out, expected)
    downloaded = [f for f in fetched if (remote / f).exists()]
    assert sorted(downloaded) == sorted(["config.json", "model.safetensors", "vocab.json", "merges.txt",
                                         "special_tokens_map.json", "tokenizer_config.json"])


def test_unknown_hub_repo_offline_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "JMOSS_HOME": str(tmp_path / "home")}
    code = "from jmoss.converters.convert import convert; convert('nobody/nothing', progress=False)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "ModelNotFoundError" in run.stderr and "HF_HUB_OFFLINE" in run.stderr


# ------------------------------------------------------------------------------ errors


def test_missing_shard_is_named(model, tmp_path: Path) -> None:
    src = save_torch_shards(model, tmp_path / "src", n_shards=3)
    (src / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"missing: pytorch_model-00002-of-00003\.bin"):
        convert(str(src), tmp_path / "out", progress=False)


def test_truncated_shard_is_named(model, tmp_path: Path) -> None:
    src = save_torch_shards(model, tmp_path / "src", n_shards=3)
    shard = src / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00003\.bin is truncated.*re-download"):
        convert(str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_truncated_safetensors_is_named(model, tmp_path: Path) -> None:
    src = save_safetensors(model, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is truncated \(expected at least {len(data)} bytes, found {len(data) - 100}\)"):
        convert(str(src), tmp_path / "out", progress=False)


def test_a_tensor_shape_that_contradicts_the_config(model, tmp_path: Path) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": 320}))
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight .* shape \[300, 64\].*says \[320, 64\]"):
        convert(str(src), tmp_path / "out", progress=False)


def test_unknown_architecture(model, tmp_path: Path) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        convert(str(src), tmp_path / "out", progress=False)
    (src / "config.json").write_text(json.dumps(config))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(src / "config.json", foreign)
    save_sharded_state_dict({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, foreign, 1, index=False)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight is not part of a MOSS/CodeGen"):
        convert(str(foreign), tmp_path / "out2", progress=False)


def test_a_shard_with_a_disallowed_pickle_global_is_refused(model, tmp_path: Path) -> None:
    src = save_torch_shards(model, tmp_path / "src", n_shards=1, index=False)
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"transformer.wte.weight": Evil()}, src / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        convert(str(src), tmp_path / "out", progress=False)
    assert not marker.exists()


def test_missing_tensors_are_listed(model, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(model.config.to_dict()))
    sd = {k: v for k, v in model.state_dict().items() if "h.1.mlp" not in k}
    save_sharded_state_dict(sd, src, 1, index=False)
    with pytest.raises(CheckpointError, match=r"layer 1: mlp\.fc_in\.weight, mlp\.fc_in\.bias"):
        convert(str(src), tmp_path / "out", progress=False)


def test_disk_full_is_reported_before_and_during_writing(model, expected, tmp_path: Path, monkeypatch) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(convert_mod.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(StoreError, match=r"not enough disk space.*--out on another disk"):
        convert(str(src), tmp_path / "out", progress=False)
    monkeypatch.undo()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "posix_fallocate", no_space)  # the kernel's answer on a full disk
    with pytest.raises(StoreError, match=r"disk full while writing .*embed\.safetensors"):
        convert(str(src), tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / MANIFEST).exists()
    monkeypatch.undo()
    assert_store_equals(convert(str(src), tmp_path / "out", progress=False), expected)


def test_progress_bar_counts_bytes_with_a_rate(model, tmp_path: Path, capsys) -> None:
    src = save_safetensors(model, tmp_path / "src")
    convert(str(src), tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "B/s" in err and "270k/270k" in err


# ------------------------------------------------------------------------------ robustness


def test_rerun_of_a_finished_conversion_does_nothing(model, tmp_path: Path) -> None:
    src = save_safetensors(model, tmp_path / "src")
    out = convert(str(src), tmp_path / "out", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert(str(src), tmp_path / "out", progress=False) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = save_torch_shards(tiny_model(seed=1), tmp_path / "other")
    with pytest.raises(StoreError, match="already holds a model converted from"):
        convert(str(other), tmp_path / "out", progress=False)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from jmoss import store
    from jmoss.converters.convert import convert

    kill_after = int(sys.argv[3])
    finished = 0
    finish, write_rows = store.GroupWriter.finish, store.GroupWriter.write_rows

    def counting_finish(self):
        global finished
        record = finish(self)
        finished += 1
        return record

    def killing_write_rows(self, *args):
        write_rows(self, *args)
        if finished >= kill_after:  # mid-way through the next group's .tmp file
            os.kill(os.getpid(), signal.SIGKILL)

    store.GroupWriter.finish, store.GroupWriter.write_rows = counting_finish, killing_write_rows
    convert(sys.argv[1], sys.argv[2], progress=False)
    """
)


def test_a_killed_conversion_resumes_to_byte_identical_output(tmp_path: Path) -> None:
    model = tiny_model(seed=3, n_layer=4)
    src = save_torch_shards(model, tmp_path / "src", n_shards=3)
    reference = convert(str(src), tmp_path / "reference", progress=False)
    out = tmp_path / "out"
    # A shell in between receives the SIGCHLD of the killed Python: once jittor is imported in this
    # pytest process (jmoss.load above), its SIGCHLD handler exits when a child dies of SIGKILL.
    shell = '"$0" -c "$1" "$2" "$3" "$4"; echo "exit=$?"'
    run = subprocess.run(["sh", "-c", shell, sys.executable, KILL_SCRIPT, str(src), str(out), "3"],
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().endswith("exit=137"), run.stdout + run.stderr  # 128 + SIGKILL
    assert not (out / MANIFEST).exists() and list(out.glob("*.tmp"))  # killed mid-group
    journal = json.loads((out / JOURNAL).read_text())
    assert sorted(journal["groups"]) == ["0", "1", "embed"]
    with pytest.raises(ModelNotFoundError, match="interrupted"):
        resolve_model(str(out))
    kept = {g: os.stat(out / layout.group_file(g)) for g in ("embed", 0, 1)}
    convert(str(src), out, progress=False)
    for g, st in kept.items():  # verified groups were skipped, not rewritten
        now = os.stat(out / layout.group_file(g))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert store_bytes(out) == store_bytes(reference)
    verify(out)


def test_ctrl_c_leaves_no_temporary_files_and_resumes(model, expected, tmp_path: Path, monkeypatch) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    write_rows = store_mod.GroupWriter.write_rows
    calls = {"n": 0}

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        write_rows(self, *args)

    monkeypatch.setattr(store_mod.GroupWriter, "write_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(str(src), tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tmp")) and (tmp_path / "out" / JOURNAL).exists()
    monkeypatch.undo()
    assert_store_equals(convert(str(src), tmp_path / "out", progress=False), expected)


def test_a_damaged_finished_group_is_redone_on_resume(model, expected, tmp_path: Path, monkeypatch) -> None:
    src = save_torch_shards(model, tmp_path / "src")
    monkeypatch.setattr(convert_mod, "finalize_store", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convert(str(src), tmp_path / "out", progress=False)
    monkeypatch.undo()
    layer = tmp_path / "out" / layout.group_file(0)
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    assert_store_equals(convert(str(src), tmp_path / "out", progress=False), expected)


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from jmoss.converters.convert import convert
    import numpy, tqdm  # everything conversion imports, before the baseline

    def status(field):  # per-process figures; ru_maxrss would carry the forking parent's peak over exec
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    baseline = status("VmRSS")
    convert(sys.argv[1], sys.argv[2], progress=False)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
    """
)


def test_peak_memory_stays_near_one_tensor_not_a_shard(tmp_path: Path) -> None:
    # 16 layers of d=512 in fp32, 2 shards: 208 MiB of weights, 104 MiB per shard, 8 MiB largest tensor.
    config = dict(model_type="codegen", vocab_size=4096, n_positions=64, n_ctx=64, n_embd=512, n_layer=16,
                  n_head=8, rotary_dim=16, n_inner=None, activation_function="gelu_new", tie_word_embeddings=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    write_tokenizer(src)
    mc = MossConfig.from_dict(config)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for group in layout.all_groups(mc):
        for name, shape in layout.group_shapes(mc, group).items():
            hf = {"wte.weight": "transformer.wte.weight", "ln_f.weight": "transformer.ln_f.weight",
                  "ln_f.bias": "transformer.ln_f.bias"}.get(name, name)
            if isinstance(group, int):
                hf = f"transformer.h.{group}." + name.replace("attn.qkv.", "attn.qkv_proj.")
            sd[hf] = torch.randn(shape, generator=gen)
    total = sum(v.numel() * 4 for v in sd.values())
    largest = max(v.numel() * 4 for v in sd.values())
    save_sharded_state_dict(sd, src, n_shards=2)
    del sd
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    numbers = json.loads(run.stdout.strip().splitlines()[-1])
    growth = numbers["peak"] - numbers["baseline"]
    mib = 2**20
    print(f"\ncheckpoint {total / mib:.0f} MiB in 2 shards, largest tensor {largest / mib:.0f} MiB; "
          f"baseline RSS {numbers['baseline'] / mib:.0f} MiB, peak {numbers['peak'] / mib:.0f} MiB, "
          f"growth {growth / mib:.1f} MiB")
    # Bound: the largest tensor's mapped pages (8 MiB) + its fp16 copy (4) + overflow-check temporaries
    # (~6) + the 16 MiB read-back buffer, ~34 MiB; 48 MiB leaves allocator slack and is < half a shard.
    assert growth < 48 * mib
    verify(tmp_path / "out")
