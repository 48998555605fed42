"""`jmoss bench` prints jmoss's run beside Jittor's native swap or transformers, with numbers.

The first run compiles Jittor's swap build (cc_flags=-DJT_SAVE_MEM=1) into
$JMOSS_HOME/jittor-savemem: about 2 minutes on 2 idle cores (4.5 minutes measured on a busy
machine); later runs reuse it.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from test_engine import SMALL, cached_store

from jmoss.placement import plan_placement
from jmoss.sizes import MiB
from jmoss.store import Store


def test_bench_cli_prints_engine_and_jittor_swap_rows_with_numbers(report):
    store = cached_store(SMALL)
    config = Store.open(store).config
    budget = plan_placement(config, device="cpu", device_memory=1 << 40, host_memory=None,
                            max_seq_len=24).minimum_device_bytes + 8 * MiB
    proc = subprocess.run(
        [sys.executable, "-m", "jmoss.cli", "bench", str(store), "--device", "cpu", "--device-memory", str(budget),
         "--prompt-tokens", "16", "--decode-tokens", "8", "--compare", "jittor"],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    out = proc.stdout
    assert re.search(r"^bound: cold sequential preadv of the store: \d+\.\d+ GB/s", out, re.M), out
    number = r"\d+\.\d+"
    for name in ("jmoss engine", "jittor swap"):
        row = next((line for line in out.splitlines() if line.startswith(name)), None)
        assert row is not None, out
        cells = re.split(r"\s{2,}", row.strip())
        # run, budget, prefill, decode, MB read, MB written, GB/s (pct), peak RSS, same tokens
        assert len(cells) == 9, cells
        for cell in cells[2:6]:
            assert re.fullmatch(number, cell), (cell, row)
        assert re.fullmatch(rf"{number} \(\d+%\)", cells[6]), row
        assert re.fullmatch(rf"{number} (MiB|GiB)", cells[7]), row
        assert cells[8] == "yes", row  # same greedy tokens as jmoss's run
    report("bench table:\n" + out)


def test_bench_compare_torch_prints_jmoss_and_best_torch_rows_against_the_memory_probe(report):
    """Everything resident: both sides' best configuration, weight GB/s next to the memory probe."""
    store = cached_store(SMALL)
    proc = subprocess.run(
        [sys.executable, "-m", "jmoss.cli", "bench", str(store), "--device", "cpu", "--prompt-tokens", "8",
         "--decode-tokens", "4", "--compare", "torch"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    out = proc.stdout
    assert re.search(r"^bound: memory read probe \(jmoss\.kernels, \d+ threads\): \d+\.\d+ GB/s", out, re.M), out
    number = r"\d+\.\d+"
    rows = {}
    for name in ("jmoss ", "torch "):
        row = next((line for line in out.splitlines() if line.startswith(name) and ":" not in line), None)
        assert row is not None, out
        cells = re.split(r"\s{2,}", row.strip())
        assert len(cells) == 9, cells
        assert cells[1] == "none"  # resident: no budget
        for cell in cells[2:6]:
            assert re.fullmatch(number, cell), (cell, row)
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # decode tok/s, weight MB read per token
        assert re.fullmatch(rf"{number} \(\d+%\)", cells[6]), row
        rows[name] = cells
    # fp16 weights for jmoss; torch reads 2 or 4 bytes per weight depending on its best dtype
    assert float(rows["torch "][4]) in (pytest.approx(float(rows["jmoss "][4]), rel=0.01),
                                         pytest.approx(2 * float(rows["jmoss "][4]), rel=0.01))
    # every torch configuration (3 dtypes x thread counts) is listed, not only the winner
    note = next(line for line in out.splitlines() if line.startswith("torch ") and "configurations measured" in line)
    assert all(d in note for d in ("float32", "bfloat16", "float16")), note
    report("bench --compare torch table:\n" + out)


def test_compare_torch_names_the_transformers_versions_it_supports(monkeypatch):
    import importlib.metadata

    from jmoss import bench
    from jmoss.errors import JmossError

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.25.1")
    with pytest.raises(JmossError, match=r"supports transformers 5\.x, found 4\.25\.1"):
        bench._supported_transformers()
