"""What a start costs and checks: resident CPU weights are the store's mapped pages, a store
changed after a load is caught, and a store that cannot do text fails before its weights load.

``jmoss.load`` with everything resident in fp16 maps every group file read-only and hashes the
mapped pages (docs/store-format.md, "What is checked, and when"). Here: the Vars really are the
file's pages (a write to the file shows through, so nothing was copied), and a store modified after
a load (one byte in place; a file replaced by another of the same size and mtime) is caught at the
next load, and by the loaded model before its next forward, also after the weights were copied into
2 MiB pages (``weight_pages``: the copy computes exactly what the mapped pages do).
``generate``/``chat``/``serve`` load the tokenizer first: a store without tokenizer files says so
before any weight is read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import jmoss
from jmoss import layout
from jmoss.errors import StoreError
from jmoss.store import Store
from test_engine import write_random_store

SHAPE = dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=3, vocab_size=256, n_positions=32)
PROMPT = [[5, 6, 7, 8]]
VICTIM = "layer_001.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_random_store(tmp_path_factory.mktemp("mapped") / "store", SHAPE)


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "store"))


def _load(path: Path):
    return jmoss.load(path, device="cpu", dtype="float16")


def _flip_in_place(path: Path, keep_times: bool) -> None:
    """Flip one byte in the middle of the victim's data, through a write(2) to the same inode."""
    file = path / VICTIM
    st = file.stat()
    fd = os.open(file, os.O_RDWR)
    try:
        at = st.st_size - 100
        byte = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([byte[0] ^ 0x40]), at)
    finally:
        os.close(fd)
    if keep_times:  # mtime put back: only ctime (which no one can set) still tells
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_same_size_and_mtime(path: Path) -> None:
    """Write a changed copy of the victim beside it, give it the old mtime, rename it over the original."""
    file = path / VICTIM
    st = file.stat()
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    tmp = file.with_name(VICTIM + ".new")
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, file)
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_resident_fp16_weights_are_the_mapped_pages_not_a_copy(store: Path, monkeypatch) -> None:
    monkeypatch.setenv("JMOSS_WEIGHT_PAGES", "mapped")
    model = _load(store)
    assert model.weights.mapped and model.plan is not None and not model.plan.streams
    assert model.weights.memory()["resident_weights"] == model.plan.resident_bytes
    var = model.weights.layer(1)["mlp.fc_out.bias"]
    offset = Store.open(store).tensor_offsets(1)["mlp.fc_out.bias"][0]
    fd = os.open(store / VICTIM, os.O_RDWR)
    try:
        os.pwrite(fd, np.array([1234.0], np.float16).tobytes(), offset)
    finally:
        os.close(fd)
    assert float(var.numpy()[0]) == 1234.0  # the Var reads the file's page: nothing was copied
    # Every mapping of a store file is read-only and shared: a write through it (by jittor or
    # anyone in this process) would fault instead of reaching the file.
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if str(store) in line]
    assert maps and {m[1] for m in maps} == {"r--s"}, maps
    with pytest.raises(StoreError, match=f"{VICTIM} changed on disk after jmoss checked"):
        model.logits(PROMPT)  # the next forward refuses the changed weights


def _pages(monkeypatch, pages: str) -> None:
    """Make the next load hold its weights as ``pages`` says (jmoss.engine.resident.weight_pages)."""
    monkeypatch.setattr("jmoss.api.weight_pages", lambda *a, **k: pages)


def _load_settled(path: Path, pages: str, monkeypatch):
    """A model loaded with ``pages``; for "copy later", with the copy finished and taken by a forward."""
    _pages(monkeypatch, pages)
    model = _load(path)
    if pages == "copy later":  # (the load's warm-up forward may have taken it already)
        assert model.weights.wait_for_copy(60)
        model.logits(PROMPT)
    assert model.weights.mapped == (pages == "mapped")
    return model


@pytest.mark.parametrize("pages", ["copied", "copy later"])
def test_weights_copied_into_huge_pages_compute_what_the_mapped_pages_do(store: Path, pages: str, monkeypatch) -> None:
    mapped = _load_settled(store, "mapped", monkeypatch)
    model = _load_settled(store, pages, monkeypatch)
    np.testing.assert_array_equal(model.logits(PROMPT), mapped.logits(PROMPT))  # same bytes, same kernels
    assert model.weights.memory() == mapped.weights.memory()
    for buf in model.weights._buffers:  # each group's copy: 2 MiB-aligned (whole huge pages), read-only
        assert buf.ctypes.data % (2 << 20) == 0 and not buf.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        model.weights._buffers[1][0] = 1
    # the embedding stays mapped and read every token: a write to it is still refused
    with open(store / "embed.safetensors", "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\x01")
    with pytest.raises(StoreError, match="embed.safetensors changed on disk"):
        model.logits(PROMPT)


def test_a_store_truncated_before_the_background_copy_is_refused_not_a_crash(store: Path, monkeypatch) -> None:
    model = _load_settled(store, "mapped", monkeypatch)
    before = model.logits(PROMPT)
    weights = model.weights
    with open(store / VICTIM, "r+b") as f:  # the mapping now ends before its last pages: touching them is SIGBUS
        f.truncate(os.path.getsize(store / VICTIM) // 2)
    weights._copy_in_background(weights._store, [*range(SHAPE["n_layer"]), layout.HEAD])
    assert not weights.wait_for_copy(60)  # a short read: no copy, and the process is alive
    with pytest.raises(StoreError, match=f"{VICTIM} changed on disk"):
        model.logits(PROMPT)
    assert np.isfinite(before).all()


def test_weight_pages_copies_later_only_where_the_copy_and_the_page_cache_both_fit(monkeypatch) -> None:
    from jmoss.engine import resident
    from jmoss.errors import JmossError

    gib = 1 << 30
    monkeypatch.delenv("JMOSS_WEIGHT_PAGES", raising=False)
    monkeypatch.setattr(resident, "transparent_huge_pages", lambda: True)
    assert resident.weight_pages(9 * gib, 22 * gib) == "copy later"  # 2 x 9 + 1 <= 22
    assert resident.weight_pages(11 * gib, 22 * gib) == "mapped"
    assert resident.weight_pages(gib, None) == "mapped"  # free memory unknown: no copy
    assert resident.weight_pages(11 * gib, 22 * gib, "copied") == "copied"  # asked for: no policy
    monkeypatch.setattr(resident, "transparent_huge_pages", lambda: False)
    assert resident.weight_pages(gib, 22 * gib) == "mapped"  # THP "never": a copy would gain nothing
    monkeypatch.setenv("JMOSS_WEIGHT_PAGES", "copied")
    assert resident.weight_pages(gib, 22 * gib) == "copied"
    monkeypatch.setenv("JMOSS_WEIGHT_PAGES", "huge")
    with pytest.raises(JmossError, match="JMOSS_WEIGHT_PAGES='huge': choose one of auto, mapped, copied"):
        resident.weight_pages(gib, 22 * gib)


@pytest.mark.parametrize("pages", ["mapped", "copy later"])
@pytest.mark.parametrize("keep_times", [False, True], ids=["one byte", "one byte, mtime put back"])
def test_a_byte_written_after_a_load_is_caught_by_the_model_and_at_the_next_load(store: Path, keep_times: bool,
                                                                                  pages: str, monkeypatch) -> None:
    # "copy later": the copy was taken by the first forward, and the files are still checked after it
    model = _load_settled(store, pages, monkeypatch)
    before = model.logits(PROMPT)
    _flip_in_place(store, keep_times)
    with pytest.raises(StoreError, match=VICTIM):
        model.logits(PROMPT)
    with pytest.raises(StoreError, match=f"{VICTIM} does not match the hash its manifest records"):
        _load(store)
    assert np.isfinite(before).all()


def test_a_file_replaced_with_the_same_size_and_mtime_is_caught_at_the_next_load(store: Path, monkeypatch) -> None:
    model = _load_settled(store, "mapped", monkeypatch)
    before = model.logits(PROMPT)
    _replace_same_size_and_mtime(store)
    # The loaded model still maps the old file's checked bytes, but unlinking it changed its ctime,
    # and a changed identity is refused whatever changed it (strict: load again).
    with pytest.raises(StoreError, match=f"{VICTIM} changed on disk"):
        model.logits(PROMPT)
    assert np.isfinite(before).all()
    with pytest.raises(StoreError, match=f"{VICTIM} does not match the hash its manifest records"):
        _load(store)


def test_every_load_hashes_every_file_again(store: Path, monkeypatch) -> None:
    """No verification is remembered between loads: each load hashes what it maps (the guarantee
    does not rest on file identities alone, which a disk's own corruption leaves unchanged)."""
    from jmoss import store as store_mod

    hashed: list[int] = []
    real = store_mod.fast_hash_mapping
    monkeypatch.setattr(store_mod, "fast_hash_mapping", lambda mm: (hashed.append(len(mm)), real(mm))[1])
    groups = layout.all_groups(Store.open(store).config)
    for _ in range(2):
        _load(store)
    assert len(hashed) == 2 * len(groups)


# ----------------------------------------------------------------------------- fail fast


def test_a_store_without_tokenizer_files_fails_before_any_weight_is_read(store: Path, monkeypatch) -> None:
    from jmoss.errors import TokenizerError

    assert not any((store / name).exists() for name in ("vocab.json", "tokenizer.json"))
    touched: list[object] = []
    monkeypatch.setattr(Store, "mapping", lambda self, g: touched.append(g))
    monkeypatch.setattr(Store, "span_hasher", lambda self, g: touched.append(g))
    with pytest.raises(TokenizerError, match="has no tokenizer files") as err:
        jmoss.load(store, device="cpu", require_tokenizer=True)
    assert "weights were not loaded" in str(err.value) and not touched


def test_jmoss_generate_says_so_in_one_line_without_loading_weights(store: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "jmoss.cli", "generate", str(store), "hi", "--max-new-tokens", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "has no tokenizer files" in errors[0], proc.stderr[-2000:]
    assert "jittor" not in proc.stderr.lower()  # it stopped before jittor was even imported


# ----------------------------------------------------------------------------- kernels


def test_the_first_load_compiles_every_kernel_a_later_forward_uses(store: Path) -> None:
    """Jittor's profiler names the kernel file of every op it runs: whatever a short or long
    prompt, a decode step, full logits or a padded batch of two run later, the warm-up ran first."""
    from jmoss import warmup

    model = _load(store)
    jt = model.jt
    warmup.marker_path(model).unlink(missing_ok=True)
    with jt.profile_scope(warmup=0, rerun=0) as warm:
        assert warmup.warm_up(model)
    assert warmup.marker_path(model).exists() and not warmup.warm_up(model)  # later loads skip it
    with jt.profile_scope(warmup=0, rerun=0) as used:
        session = model.session(max_len=32)
        session.prefill([[1, 2, 3]])
        session.decode([4])
        session.prefill([list(range(5, 25))])  # 20 rows: the per-op layer, on a cache already holding 4
        model.logits([[1, 2, 3, 4, 5]])
        pair = model.session(batch=2, max_len=8)
        pair.prefill([[1, 2, 3], [4, 5]])
        pair.decode([6, 7])

    def kernels(report) -> set[str]:
        return {row[1] for row in report[1:]}

    assert kernels(used) and kernels(used) <= kernels(warm), sorted(kernels(used) - kernels(warm))
