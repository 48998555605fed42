"""Re-running `jmoss convert SRC --out STORE` on a damaged store repairs it, rewriting only what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jmoss
from fixtures_checkpoints import save_torch_shards, tiny_model
from jmoss import store as store_mod
from jmoss import layout
from jmoss.converters.convert import convert
from jmoss.errors import StoreError
from jmoss.store import MANIFEST, JOURNAL, Store, verify

JMOSS = [sys.executable, "-m", "jmoss.cli"]


def jmoss_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*JMOSS, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy())


def store_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A source checkpoint, its converted store's bytes, and the logits that store gives."""
    root = tmp_path_factory.mktemp("repair")
    src = save_torch_shards(tiny_model(seed=5, n_layer=3), root / "src", n_shards=2)
    reference = convert(str(src), root / "reference", progress=False)
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 11))
    logits = jmoss.load(str(reference), device="cpu", dtype="float32").logits(ids)
    return src, store_bytes(reference), ids, logits


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    # name -> (how, files it must rewrite; None: the manifest is unreadable, so everything is redone)
    "truncated layer": (lambda out: _truncate(out / layout.group_file(1)), {"layer_001.safetensors"}),
    "flipped bytes in a layer": (lambda out: _flip(out / layout.group_file(0), -5), {"layer_000.safetensors"}),
    "flipped byte in a layer header": (lambda out: _flip(out / "head.safetensors", 20), {"head.safetensors"}),
    "deleted layer": (lambda out: (out / layout.group_file(2)).unlink(), {"layer_002.safetensors"}),
    "deleted tokenizer file": (lambda out: (out / "vocab.json").unlink(), set()),
    "manifest cut short": (lambda out: _truncate(out / MANIFEST), None),
    "manifest deleted": (lambda out: (out / MANIFEST).unlink(), None),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_reconvert_repairs_each_kind_of_damage(converted, tmp_path: Path, damage: str) -> None:
    src, reference, _, _ = converted
    out = convert(str(src), tmp_path / "store", progress=False)
    how, rewritten = DAMAGE[damage]
    how(out)
    assert jmoss_cli("verify", str(out)).returncode == 1
    before = {p.name: os.stat(p) for p in out.glob("*.safetensors")}
    run = jmoss_cli("convert", str(src), "--out", str(out), "--no-progress")
    assert run.returncode == 0, run.stderr
    check = jmoss_cli("verify", str(out))
    assert check.returncode == 0 and "all files verified" in check.stdout, check.stderr
    assert store_bytes(out) == reference  # byte for byte what a clean conversion writes
    if rewritten is not None:  # intact group files were kept, not rewritten
        for name, st in before.items():
            if name not in rewritten:
                now = os.stat(out / name)
                assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert not (out / JOURNAL).exists() and not list(out.glob("*.tmp"))


def test_three_damages_at_once_repair_to_the_same_logits(converted, tmp_path: Path) -> None:
    src, reference, ids, logits = converted
    out = convert(str(src), tmp_path / "store", progress=False)
    _truncate(out / layout.group_file(0))
    _flip(out / layout.group_file(2), -1)
    (out / "embed.safetensors").unlink()
    with pytest.raises(StoreError, match=r"embed\.safetensors: missing.*layer_000\.safetensors: \d+ bytes"):
        Store.open(out)
    run = jmoss_cli("convert", str(src), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "layer_002.safetensors: sha256 mismatch" in run.stdout and f"converted {src} -> {out}" in run.stdout
    assert jmoss_cli("verify", str(out)).returncode == 0
    assert store_bytes(out) == reference
    got = jmoss.load(str(out), device="cpu", dtype="float32").logits(ids)
    assert np.array_equal(got, logits)


def test_rerun_on_an_intact_store_hashes_it_and_writes_nothing(converted, tmp_path: Path, report, monkeypatch) -> None:
    src, _, _, _ = converted
    out = convert(str(src), tmp_path / "store", progress=False)
    before = {p.name: os.stat(p).st_mtime_ns for p in out.iterdir()}
    hashed: list[str] = []
    real = store_mod.file_hashes

    def counting(path, progress=None):
        hashed.append(Path(path).name)
        return real(path, progress)

    monkeypatch.setattr(store_mod, "file_hashes", counting)
    assert convert(str(src), out, progress=False) == out
    monkeypatch.undo()
    assert {p.name: os.stat(p).st_mtime_ns for p in out.iterdir()} == before
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(hashed) == sorted(manifest["files"])  # every file once, no second pass on resume
    # The cost of that re-check is one sha256 pass over the store: measure its rate here.
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(64 << 20))
    start = time.perf_counter()
    real(big)
    rate = 64 / (time.perf_counter() - start)
    report(f"re-check of a finished store hashes every file once: sha256 + xxh3 at {rate:.0f} MiB/s "
           f"(a 32 GB moss-moon-003 store: ~{32e9 / 2**20 / rate:.0f} s plus its disk read)")
    verify(out)
