"""Tampered stores (issue #17): every changed byte is caught before it is used (stores edited and
re-sealed so that their hashes match, issue #26: tests/test_store_check.py).

A small but complete store (MOSS tokenizer, 2 layers) is copied and damaged one way per case: a
byte flip in every kind of file, manifest edits (also re-sealed, as a knowing editor would),
header shifts, swapped, truncated or linked files. For each: `verify` fails, and loading
(``Store.open`` and every group read) raises a JmossError naming the file and the repair
command before any array of the damaged file is handed out. The engine's own reads (resident
and streamed) and the CLI (`jmoss verify`, `jmoss generate`) are checked on a sample.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.errors import JmossError, StoreError
from jmoss.store import FAST_HASH, MANIFEST, Store, sealed_manifest_bytes, verify, write_store_from_groups
from moss_fixtures import moss_tokenizer_dir

CONFIG = MossConfig(vocab_size=107008, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, model_type="moss",
                    bos_token_id=106028, eos_token_id=106068)
GROUP_FILES = [layout.group_file(g) for g in layout.all_groups(CONFIG)]
TOKENIZER = ["vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, shared_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    groups = {
        g: {n: (rng.standard_normal(s) * 0.05).astype(np.float16) for n, s in layout.group_shapes(CONFIG, g).items()}
        for g in layout.all_groups(CONFIG)
    }
    tok = moss_tokenizer_dir(shared_dir, root / "tok")
    out = write_store_from_groups(root / "store", CONFIG, groups, tokenizer_dir=tok, source={"id": "test/hostile"})
    verify(out)
    return out


ENGINE_CONFIG = MossConfig(vocab_size=64, n_positions=64, n_embd=256, n_layer=8, n_head=4, rotary_dim=8, model_type="moss")


@pytest.fixture(scope="module")
def engine_pristine(tmp_path_factory) -> Path:
    """A store whose layers outweigh its head, so a small budget streams them."""
    rng = np.random.default_rng(1)
    groups = {
        g: {n: (rng.standard_normal(s) * 0.05).astype(np.float16) for n, s in layout.group_shapes(ENGINE_CONFIG, g).items()}
        for g in layout.all_groups(ENGINE_CONFIG)
    }
    return write_store_from_groups(tmp_path_factory.mktemp("engine") / "store", ENGINE_CONFIG, groups, source={"id": "test/engine"})


def _store(pristine: Path, tmp: Path) -> Path:
    dst = tmp / "store"
    shutil.copytree(pristine, dst, symlinks=True)
    return dst


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _write_manifest(path: Path, manifest: dict, seal: bool) -> None:
    data = sealed_manifest_bytes(manifest) if seal else (json.dumps(manifest, indent=2) + "\n").encode()
    (path / MANIFEST).write_bytes(data)


def _data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _flip(name: str, where: str):
    def apply(path: Path, tmp: Path) -> None:
        file = path / name
        data = bytearray(file.read_bytes())
        start = _data_start(file) if name.endswith(".safetensors") else 0
        if where == "header padding":  # a space of the padding becomes a newline: still valid JSON
            pos = data.rindex(b" ", 0, start)
            data[pos] = ord("\n")
        else:
            pos = {"first data byte": start, "middle": (start + len(data)) // 2, "last byte": len(data) - 1}[where]
            data[pos] ^= 0x01
        file.write_bytes(bytes(data))

    return apply, name


def _edit_manifest(edit, seal: bool = False, target: str = MANIFEST):
    def apply(path: Path, tmp: Path) -> None:
        manifest = _manifest(path)
        manifest = edit(manifest, path, tmp) or manifest
        _write_manifest(path, manifest, seal)

    return apply, target


def _raw_manifest(raw: bytes):
    return (lambda path, tmp: (path / MANIFEST).write_bytes(raw)), MANIFEST


def _shift_header(name: str, by: int, old_store: bool = False):
    """Move every data_offsets by ``by`` bytes, header length kept (padding absorbs the change)."""

    def apply(path: Path, tmp: Path) -> None:
        file = path / name
        raw = file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        for k, v in header.items():
            if k != "__metadata__":
                v["data_offsets"] = [v["data_offsets"][0] + by, v["data_offsets"][1] + by]
        text = json.dumps(header, separators=(",", ":")).encode()
        file.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])
        if old_store:
            _strip_fast_hashes(path)

    return apply, name


def _strip_fast_hashes(path: Path) -> None:
    manifest = _manifest(path)
    manifest.pop("checksum", None)
    for record in manifest["files"].values():
        record.pop(FAST_HASH, None)
    _write_manifest(path, manifest, seal=False)


def _old(case):
    """The same damage in a store written before fast hashes (no xxh3, no manifest seal)."""
    apply, name = case

    def both(path: Path, tmp: Path) -> None:
        _strip_fast_hashes(path)
        apply(path, tmp)

    return both, name


def _config_edit(old: str, new: str):
    def apply(path: Path, tmp: Path) -> None:
        text = (path / "config.json").read_text()
        assert old in text and len(old) == len(new)
        (path / "config.json").write_text(text.replace(old, new, 1))

    return apply, "config.json"


def _swap(a: str, b: str):
    def apply(path: Path, tmp: Path) -> None:
        (path / a).rename(path / "x")
        (path / b).rename(path / a)
        (path / "x").rename(path / b)

    return apply, a


def _link_outside(name: str):
    def apply(path: Path, tmp: Path) -> None:
        shutil.move(path / name, tmp / name)  # identical bytes, but outside the store
        os.symlink(tmp / name, path / name)

    return apply, name


def _drop(name: str, seal: bool):
    return _edit_manifest(lambda m, p, t: (m["files"].pop(name), m.get("groups", {}).pop(
        next((k for k, v in m.get("groups", {}).items() if v == name), "none"), None))[0] and None, seal=seal, target=name)


def _add_entry(name: str, seal: bool):
    def edit(m, p, t):
        m["files"][name] = {"size": 1, "sha256": "0" * 64, FAST_HASH: "0" * 32}

    return _edit_manifest(edit, seal=seal, target=name)


def _set_record(name: str, field: str, value, seal: bool = False):
    def edit(m, p, t):
        m["files"][name][field] = value

    return _edit_manifest(edit, seal=seal, target=MANIFEST if not seal else name)


CASES: dict[str, tuple] = {}
for _name in GROUP_FILES:
    for _where in ("header padding", "first data byte", "middle", "last byte"):
        CASES[f"flip {_name} {_where}"] = _flip(_name, _where)
for _name in ["config.json", *TOKENIZER]:
    for _where in ("first data byte", "middle", "last byte"):
        CASES[f"flip {_name} {_where}"] = _flip(_name, _where)
CASES.update({
    "flip jmoss.json in a sha256 digit": (lambda p, t: (p / MANIFEST).write_text(_flip_hex((p / MANIFEST).read_text(), '"sha256": "')), MANIFEST),
    "flip jmoss.json in a fast-hash digit": (lambda p, t: (p / MANIFEST).write_text(_flip_hex((p / MANIFEST).read_text(), f'"{FAST_HASH}": "')), MANIFEST),
    "jmoss.json source id edited": _edit_manifest(lambda m, p, t: m["source"].__setitem__("id", "evil/other")),
    "jmoss.json whitespace added": (lambda p, t: (p / MANIFEST).write_bytes((p / MANIFEST).read_bytes().replace(b'{\n', b'{ \n', 1)), MANIFEST),
    "config.json n_layer 2 -> 1 (same size)": _config_edit('"n_layer": 2', '"n_layer": 1'),
    "config.json n_embd 32 -> 16 (same size)": _config_edit('"n_embd": 32', '"n_embd": 16'),
    "config.json eos id edited (same size)": _config_edit('"eos_token_id": 106068', '"eos_token_id": 106000'),
    "layer_001 entry removed from the manifest": _drop("layer_001.safetensors", seal=False),
    "layer_001 entry removed, manifest re-sealed": _drop("layer_001.safetensors", seal=True),
    "head entry removed, manifest re-sealed": _drop("head.safetensors", seal=True),
    "vocab.json entry removed, manifest re-sealed": _drop("vocab.json", seal=True),
    "config.json entry removed, manifest re-sealed": _drop("config.json", seal=True),
    "entry ../../../etc/passwd added": _add_entry("../../../etc/passwd", seal=False),
    "entry ../../../etc/passwd added, re-sealed": _add_entry("../../../etc/passwd", seal=True),
    "entry /etc/passwd added, re-sealed": _add_entry("/etc/passwd", seal=True),
    "entry evil.txt added, re-sealed": _add_entry("evil.txt", seal=True),
    "entry layer_002 added, re-sealed": _add_entry("layer_002.safetensors", seal=True),
    "entry size is a string": _set_record("layer_000.safetensors", "size", "big"),
    "entry sha256 is a number, re-sealed": _set_record("layer_000.safetensors", "sha256", 5, seal=True),
    "entry is a list, re-sealed": _edit_manifest(lambda m, p, t: m["files"].__setitem__("layer_000.safetensors", [1]), seal=True),
    "entry size off by one, re-sealed": _edit_manifest(lambda m, p, t: m["files"]["head.safetensors"].__setitem__(
        "size", m["files"]["head.safetensors"]["size"] + 1), seal=True, target="head.safetensors"),
    "groups mapping edited, re-sealed": _edit_manifest(lambda m, p, t: m["groups"].__setitem__("0", "layer_001.safetensors"), seal=True),
    "format_version 3 (unknown)": _edit_manifest(lambda m, p, t: m.__setitem__("format_version", 3), seal=True,
                                                 target="format 3"),
    "format_version 2 on an fp16 store, re-sealed": _edit_manifest(lambda m, p, t: m.__setitem__("format_version", 2),
                                                                   seal=True, target="packed"),
    "files is a list": _edit_manifest(lambda m, p, t: m.__setitem__("files", list(m["files"])), seal=True),
    "manifest is a list": _raw_manifest(b"[1, 2]"),
    "manifest not JSON": _raw_manifest(b"{files"),
    "manifest not UTF-8": _raw_manifest(b'{"files": {"\xff": 1}}'),
    "manifest 100000-deep": _raw_manifest(b'{"files": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "manifest 20 MiB": _raw_manifest(b'{"files": {}, "x": "' + b"a" * (20 << 20) + b'"}'),
    "manifest truncated": (lambda p, t: (p / MANIFEST).write_bytes((p / MANIFEST).read_bytes()[:-40]), MANIFEST),
    "manifest symlink to an outside copy": _link_outside(MANIFEST),
    "header offsets shifted by 2": _shift_header("layer_000.safetensors", 2),
    "header offsets shifted by -2": _shift_header("head.safetensors", -2),
    "header offsets shifted, old store": _shift_header("layer_001.safetensors", 2, old_store=True),
    "header shifted and manifest hashes updated, seal not": (lambda p, t: _rehash_unsealed(p, "layer_000.safetensors"), "layer_000.safetensors"),
    "layer files swapped (same size)": _swap("layer_000.safetensors", "layer_001.safetensors"),
    "layer_001 truncated by one byte": (lambda p, t: (p / "layer_001.safetensors").write_bytes((p / "layer_001.safetensors").read_bytes()[:-1]), "layer_001.safetensors"),
    "embed extended by one byte": (lambda p, t: (p / "embed.safetensors").write_bytes((p / "embed.safetensors").read_bytes() + b"\0"), "embed.safetensors"),
    "head replaced by a folder": (lambda p, t: ((p / "head.safetensors").unlink(), (p / "head.safetensors").mkdir()), "head.safetensors"),
    "layer_000 deleted": (lambda p, t: (p / "layer_000.safetensors").unlink(), "layer_000.safetensors"),
    "layer_000 a link to an outside copy": _link_outside("layer_000.safetensors"),
    "vocab.json a link to an outside copy": _link_outside("vocab.json"),
    "vocab.json -> /etc/passwd": (lambda p, t: ((p / "vocab.json").unlink(), os.symlink("/etc/passwd", p / "vocab.json")), "vocab.json"),
    "config.json a link to an outside copy": _link_outside("config.json"),
    "old store: config.json flipped": _old(_flip("config.json", "middle")),
    "old store: vocab.json flipped": _old(_flip("vocab.json", "middle")),
    "old store: n_layer 2 -> 1": _old(_config_edit('"n_layer": 2', '"n_layer": 1')),
    "old store: entry removed": _old(_drop("layer_001.safetensors", seal=False)),
    "old store: entry ../../../etc/passwd": _old(_add_entry("../../../etc/passwd", seal=False)),
})
# Data damage in a store without fast hashes (written before them, or downgraded to look so): it
# would load unhashed, so such a store is refused whole (docs/store-format.md).
OLD_STORE_DAMAGE = {"old store: layer_000 data flipped": _old(_flip("layer_000.safetensors", "middle")),
                    "old store: embed data flipped": _old(_flip("embed.safetensors", "last byte"))}


def _flip_hex(text: str, prefix: str) -> str:
    at = text.index(prefix) + len(prefix)
    digit = text[at]
    return text[:at] + ("1" if digit == "0" else "0") + text[at + 1 :]


def _rehash_unsealed(path: Path, name: str) -> None:
    from jmoss.store import file_record

    _shift_header(name, 2)[0](path, path)
    manifest = _manifest(path)
    manifest["files"][name] = file_record(path / name)
    _write_manifest(path, manifest, seal=False)  # the old checksum stays: it no longer matches


def _load_everything(path: Path) -> None:
    store = Store.open(path)
    for g in store.groups():
        store.group(g)


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_caught_before_use(pristine: Path, case: str, tmp_path: Path) -> None:
    path = _store(pristine, tmp_path)
    apply, target = CASES[case]
    apply(path, tmp_path)
    with pytest.raises(JmossError) as err:
        verify(path)
    assert target in str(err.value) or MANIFEST in str(err.value), str(err.value)
    with pytest.raises(JmossError) as err:
        _load_everything(path)
    message = str(err.value)
    assert target in message or MANIFEST in message, message
    assert "jmoss convert" in message, message


@pytest.mark.parametrize("case", list(OLD_STORE_DAMAGE))
def test_a_store_without_fast_hashes_is_refused_at_load_and_by_verify(pristine: Path, case: str, tmp_path: Path) -> None:
    path = _store(pristine, tmp_path)
    _strip_fast_hashes(path)
    apply, target = OLD_STORE_DAMAGE[case]
    for damaged in (False, True):
        if damaged:
            apply(path, tmp_path)
        for run in (lambda: verify(path), lambda: _load_everything(path)):
            with pytest.raises(StoreError, match=r'store check "manifest".*older jmoss.*jmoss convert test/hostile'):
                run()


def test_a_pristine_store_loads_and_verifies_and_each_file_is_hashed_once(pristine: Path, tmp_path: Path, monkeypatch) -> None:
    from jmoss import store as store_mod

    path = _store(pristine, tmp_path)
    verify(path)
    hashed: list[int] = []
    real = store_mod.fast_hash_mapping
    monkeypatch.setattr(store_mod, "fast_hash_mapping", lambda mm: (hashed.append(len(mm)), real(mm))[1])
    store = Store.open(path)
    assert store.fast_hashed
    for _ in range(3):
        for g in store.groups():
            store.group(g)
        store.map_groups(store.groups())
    assert sorted(hashed) == sorted((path / name).stat().st_size for name in GROUP_FILES)


# ----------------------------------------------------------------------------- the engine and the CLI


@pytest.mark.parametrize("case", ["flip layer_001.safetensors middle", "flip layer_001.safetensors last byte",
                                  "header offsets shifted by 2"])
@pytest.mark.parametrize("where", ["resident", "streamed"])
def test_the_engine_checks_what_it_reads_itself(engine_pristine: Path, case: str, where: str, tmp_path: Path) -> None:
    """The CPU engine reads spans with preadv (not via Store.group): resident groups are checked
    at construction, streamed ones in the reader thread on their first read, before use."""
    from jmoss.engine import StreamingWeights
    from jmoss.jittor_setup import get_jittor
    from jmoss.placement import plan_placement

    path = _store(engine_pristine, tmp_path)
    CASES[case][0](path, tmp_path)
    store = Store.open(path)
    minimum = plan_placement(store.config, device="cpu", device_memory=1 << 40, host_memory=None,
                             max_seq_len=16).minimum_device_bytes
    plan = plan_placement(store.config, device="cpu", device_memory=(1 << 40) if where == "resident" else minimum,
                          host_memory=None, max_seq_len=16)
    streamed = [p.group for p in plan.placements if p.where != "device" and p.group != layout.EMBED]
    assert bool(streamed) == (where == "streamed")
    with pytest.raises(JmossError) as err:
        weights = StreamingWeights(store, plan, get_jittor("cpu"))
        try:
            for i in range(ENGINE_CONFIG.n_layer):
                weights.layer(i)
            weights.head()
        finally:
            weights.close()
    assert CASES[case][1] in str(err.value) and "jmoss convert" in str(err.value), str(err.value)


CLI_CASES = ["flip layer_000.safetensors middle", "config.json n_layer 2 -> 1 (same size)",
             "layer_001 entry removed, manifest re-sealed", "header offsets shifted by 2", "flip vocab.json middle",
             "entry ../../../etc/passwd added, re-sealed"]


@pytest.mark.parametrize("command", ["verify", "generate"])
@pytest.mark.parametrize("case", CLI_CASES)
def test_the_cli_says_one_error_line_and_no_traceback(pristine: Path, case: str, command: str, tmp_path: Path) -> None:
    path = _store(pristine, tmp_path)
    CASES[case][0](path, tmp_path)
    args = [str(path)] if command == "verify" else [str(path), "hello", "--max-new-tokens", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "jmoss.cli", command, *args], capture_output=True, text=True,
                          env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]


def test_case_counts(report) -> None:
    total = len(CASES) + len(OLD_STORE_DAMAGE)
    report(f"tampered-store cases: {len(CASES)} caught at load and by verify, {len(OLD_STORE_DAMAGE)} old-store data "
           f"flips refused with their store; total {total} (crafted, re-sealed stores: tests/test_store_check.py)")
    assert total >= 60
