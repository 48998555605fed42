"""The fix a damaged or unfinished store names: the exact `jmoss convert SOURCE [--out STORE]` to run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_checkpoints import save_safetensors, tiny_model
from jmoss import layout
from jmoss.config import MossConfig
from jmoss.converters.convert import convert
from jmoss.errors import ModelNotFoundError, StoreError
from jmoss.store import (
    JOURNAL,
    MANIFEST,
    Store,
    default_store_dir,
    default_store_dir_for_local,
    repair_command,
    resolve_model,
    verify,
    write_store_from_groups,
)

CONFIG = MossConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, model_type="moss")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _groups(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {g: {n: rng.normal(size=s).astype(np.float16) for n, s in layout.group_shapes(CONFIG, g).items()}
            for g in layout.all_groups(CONFIG)}


def _hub_store(out: Path) -> Path:
    return write_store_from_groups(out, CONFIG, _groups(), source={"id": "fnlp/moss-tiny", "revision": COMMIT, "format": "pytorch"})


def _damage(out: Path) -> None:
    layer = out / layout.group_file(1)
    layer.write_bytes(layer.read_bytes()[:-64])


def _command(message: str) -> str:
    """The one command in backticks a message tells the user to run."""
    commands = re.findall(r"`(jmoss convert [^`]*)`", message)
    assert len(commands) == 1, message
    return commands[0]


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("JMOSS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_damaged_store_at_the_default_place_names_the_repo_without_out(home: Path) -> None:
    out = _hub_store(default_store_dir("fnlp/moss-tiny"))
    _damage(out)
    expected = f"jmoss convert fnlp/moss-tiny --revision {COMMIT}"
    with pytest.raises(StoreError) as err:
        verify(out)
    assert "layer_001.safetensors" in str(err.value) and _command(str(err.value)) == expected
    assert "Delete" not in str(err.value)  # re-converting repairs in place now
    for load in (lambda: Store.open(out), lambda: Store.open(resolve_model("fnlp/moss-tiny"))):
        with pytest.raises(StoreError) as err:
            load()
        assert _command(str(err.value)) == expected and "to repair it" in str(err.value)


def test_a_damaged_out_store_names_its_out(home: Path, tmp_path: Path) -> None:
    out = _hub_store(tmp_path / "elsewhere" / "my store")
    _damage(out)
    expected = f"jmoss convert fnlp/moss-tiny --revision {COMMIT} --out '{out}'"
    for check in (verify, Store.open):
        with pytest.raises(StoreError) as err:
            check(out)
        assert _command(str(err.value)) == expected


def test_a_local_source_never_gets_out_into_its_own_folder(home: Path, tmp_path: Path) -> None:
    src = save_safetensors(tiny_model(seed=2), tmp_path / "ckpt")
    default = convert(str(src), progress=False)
    assert default == default_store_dir_for_local(src)
    elsewhere = convert(str(src), tmp_path / "converted", progress=False)
    _damage(default)
    _damage(elsewhere)
    with pytest.raises(StoreError) as err:
        verify(default)
    assert _command(str(err.value)) == f"jmoss convert {src}"
    with pytest.raises(StoreError) as err:
        Store.open(elsewhere)
    assert _command(str(err.value)) == f"jmoss convert {src} --out {elsewhere}"
    with pytest.raises(StoreError, match="is a checkpoint folder"):
        convert(str(src), src, progress=False)  # the store may not go into the source folder


def test_the_cli_chat_error_is_one_line_with_the_repair_command(home: Path, tmp_path: Path) -> None:
    out = _hub_store(tmp_path / "store")
    _damage(out)
    env = {**os.environ, "JMOSS_HOME": str(home)}
    for args in (["chat", str(out), "--device", "cpu"], ["verify", str(out)]):
        run = subprocess.run([sys.executable, "-m", "jmoss.cli", *args], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert f"`jmoss convert fnlp/moss-tiny --revision {COMMIT} --out {out}`" in run.stderr


def test_without_a_recorded_source_the_command_says_source_or_the_repo_of_the_default_place(home: Path, tmp_path: Path) -> None:
    out = _hub_store(tmp_path / "store")
    (out / MANIFEST).unlink()
    with pytest.raises(ModelNotFoundError) as err:
        Store.open(out)
    assert _command(str(err.value)) == f"jmoss convert SOURCE --out {out}" and "SOURCE: the Hugging Face repo id" in str(err.value)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(out))  # a store's own files: not mistaken for a checkpoint to convert
    assert _command(str(err.value)) == f"jmoss convert SOURCE --out {out}"
    named = _hub_store(default_store_dir("fnlp/moss-tiny"))
    (named / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError) as err:
        Store.open(named)
    assert _command(str(err.value)) == "jmoss convert fnlp/moss-tiny"
    (named / MANIFEST).unlink()  # an interrupted conversion: the journal records the source
    (named / JOURNAL).write_text(json.dumps({"identity": {"source": {"id": "fnlp/moss-tiny", "revision": COMMIT}}}))
    with pytest.raises(ModelNotFoundError, match="interrupted") as err:
        resolve_model("fnlp/moss-tiny")
    assert _command(str(err.value)) == f"jmoss convert fnlp/moss-tiny --revision {COMMIT}"


def test_a_file_is_never_offered_as_an_out_folder(home: Path, tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    for load in (resolve_model, Store.open):
        with pytest.raises(ModelNotFoundError) as err:
            load(str(file))
        assert "is a file" in str(err.value) and "--out" not in str(err.value)
    assert "--out" not in repair_command(default_store_dir("fnlp/moss-tiny"))
