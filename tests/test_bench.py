"""`jmoss bench` prints jmoss's run and Jittor's native swap side by side, with numbers.

The first run compiles Jittor's swap build (cc_flags=-DJT_SAVE_MEM=1) into
$JMOSS_HOME/jittor-savemem: about 2 minutes on 2 idle cores (4.5 minutes measured on a busy
machine); later runs reuse it.
"""

from __future__ import annotations

import re
import subprocess
import sys

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
