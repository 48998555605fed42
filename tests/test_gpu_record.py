"""benchmarks/gpu_record.py --dry-run: the device record's code path, on the CPU with a tiny shape."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_writes_text_and_json_record(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_record.py"), "--dry-run", "--tokens", "4",
                           "--store", str(tmp_path / "store"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_record.json").read_text())
    text = (tmp_path / "gpu_record.txt").read_text()
    assert record["device"] == "cpu" and record["probe"]["gbps"] > 0
    assert len(record["runs"]) == 5 and record["runs"][0]["budget"] is None
    ran = [r for r in record["runs"] if "tokens" in r]
    assert len(ran) == 5, [r.get("error") for r in record["runs"]]
    assert all(len(r["tokens"]) == 4 and r["tok_per_s"] > 0 for r in ran)
    # the smaller budgets stream weights every token; unconstrained streams nothing
    assert ran[0]["bytes_per_token"] == 0 and ran[-1]["bytes_per_token"] > 0
    assert record["greedy_tokens_equal"] is True
    assert "greedy tokens equal across budgets: True" in text
