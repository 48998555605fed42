"""benchmarks/gpu_record.py --dry-run: the device record's code path, on the CPU with a tiny shape.

Every budget runs in offload stream and cpu; offload cpu plans for cuda and runs the split with a
CPU backend standing in for the device, so the hybrid engine's record (the CPU segment's time, the
hand-off bytes) is produced here too, and auto's choice at each budget is set beside both runs.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_writes_text_and_json_record(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_record.py"), "--dry-run", "--tokens", "4",
                           "--store", str(tmp_path / "store"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_record.json").read_text())
    text = (tmp_path / "gpu_record.txt").read_text()
    assert record["device"] == "cpu" and record["probe"]["gbps"] > 0
    runs = record["runs"]
    assert len(runs) == 1 + 4 * 2 and runs[0]["budget"] is None
    assert [r["offload_requested"] for r in runs[1:3]] == ["stream", "cpu"]
    ran = [r for r in runs if "tokens" in r]
    assert len(ran) == len(runs), [r.get("error") for r in runs]
    assert all(len(r["tokens"]) == 4 and r["tok_per_s"] > 0 for r in ran)
    # the smaller budgets stream weights every token; unconstrained streams nothing
    assert ran[0]["bytes_per_token"] == 0 and ran[-2]["bytes_per_token"] > 0 and ran[-2]["offload"] == "stream"
    # offload cpu: the CPU computes what the budget leaves out (the larger budgets hold it all);
    # the record says how long the CPU's segment took and what crossed
    asked = [r for r in ran if r["offload_requested"] == "cpu"]
    hybrid = [r for r in asked if r["offload"] == "cpu"]
    assert hybrid and all(r["offload"] in ("cpu", "none") for r in asked)
    assert all(r["cpu_layers"] > 0 and r["hybrid"]["cpu_segment_ms_per_token"] > 0 for r in hybrid)
    assert all(r["hybrid"]["handoff_bytes_per_token"] > 0 and r["predicted_tok_s"]["cpu"] > 0 for r in hybrid)
    # auto at every budget: its choice, why, its predictions, and whether the measured runs agree
    assert [a["budget"] for a in record["auto"]] == [r["budget"] for r in runs[1::2]]
    offloaded = [a for a in record["auto"] if a["offload"] != "none"]
    assert offloaded and all(a["offload"] in ("cpu", "stream") and a["reason"] for a in offloaded)
    assert all(set(a["predicted_tok_s"]) == {"stream", "cpu"} and a["figures"]["cpu_gbps"] > 0 for a in offloaded)
    assert all(a["picked_the_faster"] in (True, False) for a in offloaded if len(a["measured_tok_s"]) == 2)
    # the stand-in device computes in fp32 like the CPU: every run gives the unconstrained tokens
    assert record["greedy_tokens_equal"] is True and all(r["tokens_equal_unconstrained"] for r in ran)
    assert "greedy tokens equal across budgets (streaming and unconstrained): True" in text
    assert "CPU segment (" in text and "auto at " in text
