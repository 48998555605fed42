"""jmoss/store.py: the on-disk format, zero-copy reads, verification and name resolution."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jmoss import store as store_mod
from jmoss import layout
from jmoss.config import MossConfig
from jmoss.errors import ModelNotFoundError, StoreError
from jmoss.store import MANIFEST, Store, default_store_dir, resolve_model, verify, write_store_from_groups

CONFIG = MossConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, model_type="moss")


def _random_groups(config: MossConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        g: {n: rng.normal(size=s).astype(np.float16) for n, s in layout.group_shapes(config, g).items()}
        for g in layout.all_groups(config)
    }


@pytest.fixture
def written(tmp_path: Path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text('{"a": 0}')
    (tok / "merges.txt").write_text("#version: 0.2\n")
    groups = _random_groups(CONFIG)
    out = write_store_from_groups(tmp_path / "store", CONFIG, groups, tokenizer_dir=tok, source={"id": "test/tiny"})
    return out, groups


def test_groups_read_back_as_read_only_mapped_pages_in_layout_order(written) -> None:
    out, groups = written
    store = Store.open(out)
    assert store.config == CONFIG
    for g in layout.all_groups(CONFIG):
        arrays = store.group(g)
        assert list(arrays) == list(layout.group_shapes(CONFIG, g))
        for name, array in arrays.items():
            assert array.dtype == np.float16 and not array.flags.writeable
            base = array
            while isinstance(base, np.ndarray):
                base = base.base
            assert isinstance(getattr(base, "obj", base), mmap.mmap)  # a view of the file's mapped pages: no copy
            assert np.array_equal(array, groups[g][name])


def test_group_files_are_standard_safetensors(written) -> None:
    out, groups = written
    for g in layout.all_groups(CONFIG):
        loaded = load_file(out / layout.group_file(g))
        assert set(loaded) == set(groups[g])
        for name in loaded:
            assert np.array_equal(loaded[name], groups[g][name])


def test_a_layer_is_one_contiguous_64_aligned_span(written) -> None:
    out, groups = written
    store = Store.open(out)
    for g in layout.all_groups(CONFIG):
        start, nbytes = store.group_data_span(g)
        assert start % 64 == 0
        assert nbytes == store.group_nbytes(g) == layout.group_nbytes(CONFIG, g)
        assert os.path.getsize(store.group_path(g)) == start + nbytes
        expected = b"".join(groups[g][n].tobytes() for n in layout.group_shapes(CONFIG, g))
        with open(store.group_path(g), "rb") as f:
            assert os.pread(f.fileno(), nbytes, start) == expected
            for name, (offset, shape, dtype) in store.tensor_offsets(g).items():
                raw = os.pread(f.fileno(), groups[g][name].nbytes, offset)
                assert np.array_equal(np.frombuffer(raw, dtype).reshape(shape), groups[g][name])


def test_manifest_lists_every_file_with_size_and_sha256(written) -> None:
    out, _ = written
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == store_mod.FORMAT_VERSION and manifest["dtype"] == "float16"
    assert manifest["source"] == {"id": "test/tiny"}
    expected = {"config.json", "vocab.json", "merges.txt", *(layout.group_file(g) for g in layout.all_groups(CONFIG))}
    assert set(manifest["files"]) == expected
    for name, record in manifest["files"].items():
        assert record["size"] == (out / name).stat().st_size
        assert record["sha256"] == store_mod.sha256_file(out / name)
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "moss"


def test_verify_names_every_damaged_or_missing_file(written) -> None:
    out, _ = written
    verify(out)
    layer = out / layout.group_file(1)
    data = bytearray(layer.read_bytes())
    data[-3] ^= 0x01
    layer.write_bytes(bytes(data))
    (out / "vocab.json").unlink()
    with pytest.raises(StoreError) as err:
        verify(out)
    assert "layer_001.safetensors: sha256 mismatch" in str(err.value)
    assert "vocab.json: missing" in str(err.value)
    assert "jmoss convert test/tiny" in str(err.value)


def test_open_refuses_incomplete_damaged_or_foreign_stores(written, tmp_path: Path) -> None:
    out, _ = written
    manifest = json.loads((out / MANIFEST).read_text())
    (out / layout.group_file(0)).rename(out / "moved")
    with pytest.raises(StoreError, match=r"layer_000\.safetensors: missing"):
        Store.open(out)
    (out / "moved").rename(out / layout.group_file(0))
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format 99"):
        Store.open(out)
    (out / MANIFEST).unlink()
    with pytest.raises(StoreError, match="not a finished jmoss store"):
        Store.open(out)
    with pytest.raises(ModelNotFoundError):
        Store.open(tmp_path / "nowhere")


def test_a_failed_write_leaves_no_manifest_and_no_temporary_files(tmp_path: Path) -> None:
    groups = _random_groups(CONFIG)
    del groups["head"]["lm_head.bias"]
    with pytest.raises(StoreError, match="lm_head.bias"):
        write_store_from_groups(tmp_path / "s", CONFIG, groups)
    assert not (tmp_path / "s" / MANIFEST).exists()
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_resolve_model_by_name_path_or_explains_the_convert_command(written, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path / "home"))
    assert default_store_dir("fnlp/moss-moon-003-sft") == tmp_path / "home" / "models" / "fnlp--moss-moon-003-sft"
    out, _ = written
    assert resolve_model(str(out)) == out
    with pytest.raises(ModelNotFoundError, match=r"`jmoss convert fnlp/moss-moon-003-sft`"):
        resolve_model("fnlp/moss-moon-003-sft")
    named = default_store_dir("fnlp/moss-moon-003-sft")
    named.mkdir(parents=True)
    (named / store_mod.JOURNAL).write_text("{}")
    with pytest.raises(ModelNotFoundError, match="interrupted.*`jmoss convert fnlp/moss-moon-003-sft`"):
        resolve_model("fnlp/moss-moon-003-sft")
    write_store_from_groups(named, CONFIG, _random_groups(CONFIG))
    assert resolve_model("fnlp/moss-moon-003-sft") == named
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="neither a jmoss store nor a Hugging Face checkpoint"):
        resolve_model(str(empty))
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face repo id"):
        resolve_model("not a name")


def test_huge_page_bytes_reads_file_and_anonymous_2mib_mappings(tmp_path):
    """What bench prints as the share of the weights in 2 MiB pages: FilePmdMapped (page-cache
    folios mapped whole, as Store.mapping asks with MADV_HUGEPAGE) plus AnonHugePages."""
    from jmoss.bench import huge_page_bytes

    rollup = tmp_path / "smaps_rollup"
    rollup.write_text("55d0c0000000-7ffd00000000 ---p 00000000 00:00 0    [rollup]\n"
                      "Rss:             9000000 kB\nAnonHugePages:      2048 kB\n"
                      "FilePmdMapped:   7340032 kB\nShmemPmdMapped:        0 kB\n")
    assert huge_page_bytes(str(rollup)) == (2048 + 7340032) * 1024
    assert huge_page_bytes(str(tmp_path / "missing")) is None
    here = huge_page_bytes()
    assert here is None or here >= 0
