"""jmoss/store_check.py: a crafted, re-sealed store is refused at load and by `jmoss verify`, in one line
that names the file and the check; nothing a store holds reaches the kernels unchecked.

The families (tests/crafted_stores.py) are generated from one small store per format (fp16; int4
with the default int8 lm_head/wte; int4 with lm_head/wte at 4 bits; int8 with fp16 lm_head/wte):
every perm, scales, zeros and vector tensor of every group at several values and positions, every
header's identity and layout, widths, config and manifest fields. Each case is applied in place,
the manifest's hashes and seal recomputed as an attacker would, checked, and undone.

Loads through jmoss.load (the engines' own readers, and the kernels), one case per perm/scales/
zeros tensor of every file and format, resident and streamed, run in a child process, so a signal
or an abort fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import crafted_stores as cs
from moss_fixtures import moss_tokenizer_dir
from jmoss import layout, store_check
from jmoss.errors import StoreError
from jmoss.store import MANIFEST, Store, verify


@pytest.fixture(scope="module")
def bases(tmp_path_factory, shared_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crafted")
    # with MOSS's tokenizer files: `jmoss generate` checks them before it loads a weight
    return cs.build_bases(root, tokenizer_dir=moss_tokenizer_dir(shared_dir, root / "tok"))


@pytest.fixture(scope="module")
def cases(bases) -> list[cs.Case]:
    return cs.cases(bases)


def _load_everything(path: Path) -> None:
    store = Store.open(path)
    for g in store.groups():
        store.group(g)


def _assert_names(message: str, case: cs.Case) -> None:
    """The refusal is one line naming the case's file and, where the case has one, the check."""
    line = next((ln for ln in message.splitlines() if case.file in ln), None)
    assert line is not None, f"{case.name}: {message}"
    if case.check is not None:
        assert f'store check "{case.check}"' in line, f"{case.name}: {message}"
    assert "jmoss convert" in message, f"{case.name}: {message}"


def test_the_pristine_stores_verify_load_and_match_their_arrays(bases) -> None:
    for fmt, path in bases.items():
        verify(path)
        store = Store.open(path)
        assert store.config.wbits == cs.FORMATS[fmt][0]
        for g in store.groups():
            store.group(g)


@pytest.mark.parametrize("family", ["value", "header", "width", "manifest"])
def test_every_crafted_store_is_refused_by_verify_and_at_load_in_one_line(bases, family: str, report) -> None:
    chosen = getattr(cs, f"{family}_cases")(bases)
    for case in chosen:
        with cs.crafted(bases[case.fmt], case) as path:
            with pytest.raises(StoreError) as err:
                verify(path)
            # one line; an edit that breaks several files at once (every layer of a changed width)
            # gets one line per file, each naming it and its check
            _assert_names(str(err.value), case)
            with pytest.raises(StoreError) as err:
                _load_everything(path)
            assert len(str(err.value).splitlines()) == 1, str(err.value)
            _assert_names(str(err.value), case)
    counts: dict = {}
    for c in chosen:
        counts[c.check] = counts.get(c.check, 0) + 1
    report(f"{family} family: {len(chosen)} crafted stores refused by verify and at load ({counts})")


def test_the_families_cover_every_format_group_and_check(bases, cases, report) -> None:
    checks = {c.check for c in cases}
    assert set(store_check.CHECKS) <= checks
    for fmt in cs.FORMATS:
        files = {c.file for c in cases if c.fmt == fmt}
        assert {layout.group_file(g) for g in layout.all_groups(cs.config_of(fmt))} <= files, fmt
    assert len({c.name for c in cases}) == len(cases)
    report(f"crafted-store cases generated: {len(cases)} "
           f"({', '.join(f'{k}: {sum(c.check == k for c in cases)}' for k in [*store_check.CHECKS, None])})")
    assert len(cases) >= 500


CHILD_TIMEOUT = 900


@pytest.fixture(scope="module")
def child_results(bases) -> dict[str, list[dict]]:
    """Every case that runs the kernels, loaded by jmoss.load (all resident, and streamed under
    the smallest budget) in child processes: with the checks as shipped, and with the value checks
    bypassed (the kernels' own bounds alone)."""
    root = next(iter(bases.values())).parent
    out = {}
    for mode in ("checked", "bypassed"):
        args = [sys.executable, str(Path(__file__).with_name("crafted_stores.py")), str(root)]
        if mode == "bypassed":
            args.append("--bypass-value-checks")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env)
        out[mode] = (proc, [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")])
    return out


def test_loads_that_would_run_the_kernels_are_refused_without_a_signal(child_results, cases, report) -> None:
    proc, results = child_results["checked"]
    assert proc.returncode == 0, f"the child died (status {proc.returncode}): {proc.stderr[-3000:]}"
    expected = {c.name: c for c in cs.child_cases(cases)}
    assert {r["case"] for r in results} == set(expected), "the child stopped early"
    for r in results:
        case = expected[r["case"]]
        assert not r["loaded"], f"{r['case']} ({r['where']}) loaded"
        _assert_names(r["error"], case)
        assert len(r["error"].splitlines()) == 1, r["error"]
    report(f"{len(results)} kernel-reaching crafted loads (resident and streamed) refused, child exit 0")


def test_with_the_value_checks_bypassed_the_kernels_still_stay_in_bounds(child_results, cases, report) -> None:
    """Defence in depth: with the value checks switched off, every such store loads and runs a forward
    in the child, which exits normally: a bad perm meets the kernels' own O(K) bound (the Linear's
    output is NaN: tests/test_quant_kernels.py), bad scales or zeros are arithmetic only (wrong
    logits, never a stray read), and wte.perm is used by numpy, which bounds every index."""
    proc, results = child_results["bypassed"]
    assert proc.returncode == 0, f"the child died (status {proc.returncode}): {proc.stderr[-3000:]}"
    assert len(results) == 2 * len(cs.child_cases(cases)) and all(r["loaded"] for r in results)
    report(f"value checks bypassed: {len(results)} crafted loads ran a forward, child exit 0, "
           f"{sum(not r['finite'] for r in results)} gave non-finite logits")


def test_value_checks_reject_exactly_the_bad_values() -> None:
    config = cs.config_of("int4")
    good = {}
    for name, (shape, dtype) in layout.group_tensors(config, 0).items():
        if name.endswith(".perm"):
            good[name] = np.random.default_rng(0).permutation(shape[0]).astype(np.int32)
        elif name.endswith(".zeros"):  # every integer 0..2^bits, -0 (== 0), and fractions in range
            good[name] = (np.arange(int(np.prod(shape))) % 17).astype(np.float16).reshape(shape)
            good[name].flat[-1] = -0.0
            good[name].flat[-2] = 7.5  # what benchmark stores use: the middle of the 4-bit codes
        elif name in store_check.value_tensors(config, 0):
            good[name] = np.full(shape, 0.5, np.float16)
    store_check.check_group_values(config, 0, good)
    zeros, perm = "mlp.fc_out.zeros", "attn.out_proj.perm"
    for value in (17.0, 16.5, -1.0, -0.5, np.nan, np.inf):
        bad = good[zeros].copy()
        bad.flat[3] = value
        with pytest.raises(store_check.CheckFailed, match=r"zeros: mlp.fc_out.zeros\[0, 3\]"):
            store_check.check_group_values(config, 0, {**good, zeros: bad})
    p = good[perm]
    for bad, why in ((np.where(p == 5, 64, p), r"is 64, outside 0..63"), (np.where(p == 5, -1, p), r"is -1, outside"),
                     (np.where(p == 5, 6, p), r"never holds 5")):
        with pytest.raises(store_check.CheckFailed, match=why):
            store_check.check_group_values(config, 0, {**good, perm: bad.astype(np.int32)})


def test_span_values_copy_exactly_the_bytes_fed_in_any_chunking() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 1000, dtype=np.uint8)
    offsets = {"a": (100 + 0, (10,), "int32"), "b": (100 + 40, (7,), "float16"), "c": (100 + 54, (946 // 2 - 27,), "float16")}
    for chunk in (1, 3, 64, 999, 1000):
        values = store_check.SpanValues(offsets, 100, ["a", "c"])
        for i in range(0, 1000, chunk):
            values.feed(data[i : i + chunk])
        got = values.arrays(1000)
        assert got["a"].tobytes() == data[0:40].tobytes() and got["c"].tobytes() == data[54 : 54 + got["c"].nbytes].tobytes()
    with pytest.raises(ValueError):
        store_check.SpanValues(offsets, 100, ["a"]).arrays(1000)


def test_an_old_store_without_fast_hashes_is_refused_saying_to_convert_again(bases) -> None:
    """A manifest from before the fast hash and the seal (or one downgraded to look like it) would let a
    changed byte load unhashed: refused at load and by verify, with the command that rewrites it."""
    case = cs.Case("strip", "fp16", MANIFEST, "manifest", lambda p: cs.edit_manifest(
        p, lambda m: (m.pop("checksum"), [r.pop("xxh3_128") for r in m["files"].values()]), seal=False), reseal=None)
    with cs.crafted(bases["fp16"], case) as path:
        for run in (lambda: verify(path), lambda: Store.open(path)):
            with pytest.raises(StoreError, match=r'store check "manifest".*older jmoss.*jmoss convert test/fp16'):
                run()


def test_the_cli_prints_one_error_line_naming_the_file_and_the_check(bases, cases, tmp_path: Path) -> None:
    """`jmoss verify` and `jmoss generate` on one crafted store per check: exit 1, no traceback, one line."""
    sample = {}
    for case in cases:
        sample.setdefault(case.check, case)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for case in sample.values():
        with cs.crafted(bases[case.fmt], case) as path:
            for args in (["verify", str(path)], ["generate", str(path), "12", "--max-new-tokens", "2", "--device", "cpu"]):
                proc = subprocess.run([sys.executable, "-m", "jmoss.cli", *args], capture_output=True, text=True,
                                      env=env, timeout=600)
                output = proc.stdout + proc.stderr
                errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
                assert proc.returncode == 1 and "Traceback" not in output and len(errors) == 1, (case.name, output[-2000:])
                _assert_names(errors[0], case)
