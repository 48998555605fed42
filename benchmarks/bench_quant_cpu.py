"""jmoss fp16 / int8 / int4 against CTranslate2 float32 / int8 / int8_float32 on the CodeGen-350M shape.

One random-init CodeGenForCausalLM of shared/assets/codegen-350M-mono/config.json (seed 0, fp16
values) is saved as a Hugging Face checkpoint; ``jmoss convert`` makes the fp16 store and the
``--quantize int8`` / ``int4`` stores from it, CTranslate2's own TransformersConverter makes its
float32 and int8 models from the same files. Every configuration runs in its own fresh process,
batch 1, the same 64-token prompt and 32 greedy steps, with the same thread count; rounds are
interleaved (fp16, int8, int4, ct2 float32, ct2 int8, ct2 int8_float32, then again) and the median
of 3 rounds is reported. Bytes per token: jmoss, the resident weight bytes one token reads (layers
and head; packed bytes for int8/int4); CTranslate2, the size of its model.bin (what its decode reads,
less the embedding it gathers). GB/s = bytes per token x decode tok/s, next to the kernels' memory
read probe.

    PYTHONPATH=$PWD:<dir with ctranslate2==4.8.5> JMOSS_THREADS=2 python benchmarks/bench_quant_cpu.py [WORKDIR]

(ctranslate2 is bench-time only, like torch: ``pip install ctranslate2==4.8.5``.)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(os.environ.get("JMOSS_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets/codegen-350M-mono"
PROMPT, NEW = 64, 32


def build(work: Path) -> dict[str, Path]:
    import shutil

    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    from jmoss.converters.convert import convert

    hf = work / "hf"
    if not (hf / "config.json").exists():
        raw = json.loads((ASSETS / "config.json").read_text())
        torch.manual_seed(0)
        model = CodeGenForCausalLM(CodeGenConfig.from_dict(raw)).eval().half()
        model.save_pretrained(hf)
        for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json",
                     "tokenizer.json"):
            shutil.copy(ASSETS / name, hf / name)
    paths = {}
    for name, kwargs in {"fp16": {}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}.items():
        paths[f"jmoss {name}"] = convert(str(hf), work / f"jmoss-{name}", progress=False, **kwargs)
    import ctranslate2.converters

    for name, quant in {"float32": "float32", "int8": "int8"}.items():
        out = work / f"ct2-{name}"
        if not (out / "model.bin").exists():
            ctranslate2.converters.TransformersConverter(str(hf)).convert(str(out), quantization=quant, force=True)
        paths[f"ct2 {name}"] = out
    return paths


CT2_CHILD = r"""
import json, sys, time, numpy as np, ctranslate2
path, compute, threads, prompt_n, new_n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
gen = ctranslate2.Generator(path, device="cpu", compute_type=compute, intra_threads=threads, inter_threads=1)
import pathlib
words = json.loads((pathlib.Path(path) / "vocabulary.json").read_text())
prompt_ids = [int(t) for t in np.random.default_rng(0).integers(0, 50000, prompt_n)]
prompt = [words[i] for i in prompt_ids]
def run():
    t0 = time.perf_counter(); gen.forward_batch([prompt_ids]); prefill = time.perf_counter() - t0
    stamps = []
    t0 = time.perf_counter()
    for step in gen.generate_tokens(prompt, max_length=new_n, min_length=new_n, sampling_topk=1):
        stamps.append(time.perf_counter())
    first = stamps[0] - t0
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return prefill, decode, len(stamps)
run()
prefill, decode, n = run()
print("RESULT " + json.dumps({"prefill_tok_s": prompt_n / prefill, "decode_tok_s": 1 / decode, "tokens": n}))
"""


def run_ct2(path: Path, compute: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CT2_CHILD, str(path), compute, str(threads), str(PROMPT), str(NEW)],
                         capture_output=True, text=True)
    if out.returncode != 0:  # recorded, not fatal: a crashed run is left out of the median
        print(f"ct2 {compute} run failed (exit {out.returncode}): {out.stderr.strip()[-300:]}", flush=True)
        return {}
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    r = json.loads(line[7:])
    r["bytes_per_token"] = (path / "model.bin").stat().st_size - 51200 * 1024 * (4 if "float32" in path.name else 1)
    return r


def run_jmoss(path: Path, threads: int) -> dict:
    from jmoss.bench import run_child

    r = run_child({"model": str(path), "device": "cpu", "device_memory": None, "prompt_tokens": PROMPT,
                   "decode_tokens": NEW, "max_seq_len": PROMPT + NEW, "name": path.name},
                  env={"JMOSS_THREADS": str(threads)})
    return r


def main() -> None:
    from jmoss import kernels

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/jmoss-bench-quant")
    work.mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("JMOSS_THREADS", "2"))
    paths = build(work)
    configs = [("jmoss fp16", None), ("jmoss int8", None), ("jmoss int4", None), ("ct2 float32", "float32"),
               ("ct2 int8", "int8"), ("ct2 int8", "int8_float32")]
    runs: dict[str, list[dict]] = {}
    for round_ in range(3):
        for name, compute in configs:
            label = name if compute is None else f"ct2 {compute}"
            r = run_jmoss(paths[name], threads) if compute is None else run_ct2(paths[name], compute, threads)
            if not r:
                continue
            runs.setdefault(label, []).append(r)
            print(f"round {round_ + 1} {label}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.2f} tok/s",
                  flush=True)
    with kernels.configured(threads=threads):
        probe = kernels.memory_read_probe()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    print(f"\nCPU: {cpu}; {threads} threads; kernels ISA {kernels.info()['isa']}, AMX prefill {kernels.amx_prefill()}")
    print(f"memory read probe: {probe:.2f} GB/s; prompt {PROMPT}, decode {NEW} greedy, median of 3 interleaved rounds\n")
    print(f"{'run':<22}{'prefill tok/s':>14}{'decode tok/s':>14}{'MB/token':>10}{'GB/s':>8}")
    medians = {}
    for label, rs in runs.items():
        pre = statistics.median(r["prefill_tok_s"] for r in rs)
        dec = statistics.median(r["decode_tok_s"] for r in rs)
        mb = rs[0]["bytes_per_token"] / 1e6
        medians[label] = (pre, dec)
        print(f"{label:<22}{pre:>14.1f}{dec:>14.2f}{mb:>10.1f}{mb * dec / 1e3:>8.2f}")
    ct2 = {k: v for k, v in medians.items() if k.startswith("ct2")}
    best_dec = max(ct2.items(), key=lambda kv: kv[1][1])
    best_pre = max(ct2.items(), key=lambda kv: kv[1][0])
    print(f"\nbest CTranslate2 decode: {best_dec[0]} {best_dec[1][1]:.2f} tok/s; best prefill: {best_pre[0]} {best_pre[1][0]:.1f} tok/s")
    for label in ("jmoss fp16", "jmoss int8", "jmoss int4"):
        pre, dec = medians[label]
        print(f"{label}: decode {dec / best_dec[1][1]:.2f}x, prefill {pre / best_pre[1][0]:.2f}x CTranslate2's best")


if __name__ == "__main__":
    main()
