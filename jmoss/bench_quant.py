"""``jmoss bench STORE --device cpu --compare ctranslate2``: jmoss fp16 / int8 / int4 against
CTranslate2 float32 / int8 / int8_float32, all made from the same weights, in one run.

From an fp16 STORE: its weights are written back as a Hugging Face CodeGen checkpoint
(``layout.to_hf_state_dict``, safetensors, the store's tokenizer files); ``jmoss convert
--quantize int8`` / ``int4`` make the packed stores from it, CTranslate2's own
``TransformersConverter`` its float32 and int8 models (in a child process). The work folder is
kept (``$JMOSS_HOME/bench-work/<store checksum>``), so a second run converts nothing.

Every configuration runs in its own fresh process, batch 1, the same random prompt and greedy
decode, the same thread count (``JMOSS_THREADS``, default the kernels'); rounds are interleaved
(jmoss fp16, int8, int4 -- where AVX-512 VNNI offers it, the three again with int8 activations,
``JMOSS_KERNELS_QUANT_COMPUTE=int8``, labelled "i8-act" -- then ct2 float32, int8, int8_float32,
then again) and the median of
``rounds`` is reported; a crashed run is reported and left out of the median. Bytes per token:
jmoss, the resident weight bytes one decode token reads (layers and head, packed bytes for
int8/int4; the embedding row is left out); CTranslate2, the size of its model.bin less its
embedding table. GB/s = bytes per token x decode tok/s, next to the kernels' memory read probe.

ctranslate2 (and torch + transformers for its converter) are needed at bench time only, like
torch for ``--compare torch``; jmoss never imports them otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from jmoss.errors import DeviceError, JmossError

Figures = dict[str, Any]

CT2_VERSION = "4.8.5"  # the release measured (benchmarks/results/quant-cpu-vs-ct2-350m.txt)
JMOSS_FORMATS = ("fp16", "int8", "int4")
CT2_COMPUTE = ("float32", "int8", "int8_float32")  # compute types; int8* run the int8 model
INSTALL = (f"pip install ctranslate2=={CT2_VERSION} torch 'transformers>=5,<6' "
           "(bench time only; or put a folder holding ctranslate2 on PYTHONPATH)")

# The jmoss rows with int8 activations (the opt-in quant_compute="int8" mode: VNNI prefill, packed decode,
# JMOSS_KERNELS_QUANT_COMPUTE=int8, what CTranslate2's int8 modes do) are labelled with this.
INT8_ACT = "i8-act"


def configs(int8_activations: bool = False) -> tuple[tuple[str, str, str], ...]:
    """(label, kind "jmoss"|"ct2", what), in round order: what is a jmoss format (":int8" appended
    for int8 activations) or a CTranslate2 compute type. The int8-activation jmoss rows only where
    that mode exists (AVX-512 VNNI prefill, AVX2/AVX-512 packed decode; elsewhere the setting is ignored
    and they would repeat the others)."""
    rows = [(f"jmoss {f}", "jmoss", f) for f in JMOSS_FORMATS]
    if int8_activations:
        rows += [(f"jmoss {f} {INT8_ACT}", "jmoss", f"{f}:int8") for f in JMOSS_FORMATS]
    return tuple(rows + [(f"ct2 {c}", "ct2", c) for c in CT2_COMPUTE])


CONFIGS = configs()


def require_ctranslate2() -> None:
    """A JmossError saying how to install what --compare ctranslate2 needs, when it is missing."""
    import importlib.util

    missing = [m for m in ("ctranslate2", "torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise JmossError(f"--compare ctranslate2 needs {' and '.join(missing)}: {INSTALL}")


def check_options(device: str, device_memory: int | None) -> None:
    if device != "cpu":
        raise DeviceError("--compare ctranslate2 runs on the CPU; use --device cpu")
    if device_memory is not None:
        raise JmossError("--compare ctranslate2 compares everything resident; leave out --device-memory")


# ------------------------------------------------------------------------------ building


def export_hf_checkpoint(store_path: Path, out: Path) -> Path:
    """The store's fp16 weights as a Hugging Face CodeGen folder (config, safetensors, tokenizer)."""
    import numpy as np
    from safetensors.numpy import save_file

    from jmoss import layout
    from jmoss.store import TOKENIZER_FILES, Store

    store = Store.open(store_path)
    config = store.config
    if layout.packed_bits(config):
        raise JmossError(f"{store_path} is a packed int{config.wbits} store; --compare ctranslate2 starts from an fp16 "
                         "store (it makes the int8/int4 ones itself): convert the checkpoint without --quantize")
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    groups = {g: store.group(g) for g in layout.all_groups(config)}
    state = {k: np.ascontiguousarray(v) for k, v in layout.to_hf_state_dict(groups, config).items()}
    hf = {**config.to_dict(), "model_type": "codegen", "architectures": ["CodeGenForCausalLM"], "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    for name in TOKENIZER_FILES:
        if (store.path / name).is_file():
            shutil.copy(store.path / name, out / name)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.rename(out / "model.safetensors")
    return out


CT2_CONVERT = r"""
import sys, ctranslate2.converters
ctranslate2.converters.TransformersConverter(sys.argv[1]).convert(sys.argv[2], quantization=sys.argv[3], force=True)
"""


def build(store_path: Path, work: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Paths of every model the comparison runs: jmoss fp16 (the store), int8, int4; ct2 float32, int8."""
    import subprocess

    from jmoss.converters.convert import convert

    hf = export_hf_checkpoint(store_path, work / "hf")
    paths = {"jmoss fp16": Path(store_path)}
    for bits in ("int8", "int4"):
        paths[f"jmoss {bits}"] = convert(str(hf), work / f"jmoss-{bits}", progress=False, quantize=bits)
    for quant in ("float32", "int8"):
        out = work / f"ct2-{quant}"
        if not (out / "model.bin").exists():
            log(f"converting {hf} for CTranslate2 ({quant})")
            done = subprocess.run([sys.executable, "-c", CT2_CONVERT, str(hf), str(out), quant], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise JmossError(f"CTranslate2's converter failed on {hf} ({quant}): {done.stderr.strip()[-600:]}")
        paths[f"ct2 {quant}"] = out
    return paths


def work_dir(store_path: Path) -> Path:
    """Where the derived checkpoints and models are kept, keyed to the store's sealed manifest."""
    from jmoss.home import jmoss_home
    from jmoss.store import read_manifest

    seal = read_manifest(store_path).get("checksum", {}).get("xxh3_128") or Path(store_path).resolve().name
    return jmoss_home() / "bench-work" / f"ct2-{str(seal)[:16]}"


# ------------------------------------------------------------------------------ running

CT2_CHILD = r"""
import json, pathlib, sys, time, numpy as np, ctranslate2
from jmoss.bench import stop_for_measurement
path, compute, threads, prompt_n, new_n, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
gen = ctranslate2.Generator(path, device="cpu", compute_type=compute, intra_threads=threads, inter_threads=1)
words = json.loads((pathlib.Path(path) / "vocabulary.json").read_text())
prompt_ids = [int(t) for t in np.random.default_rng(0).integers(0, min(vocab, len(words)), prompt_n)]
prompt = [words[i] for i in prompt_ids]
def run():
    times = []
    for _ in range(3):  # the median of 3 prefills, as jmoss's side measures it. forward_batch scores every
        # position (jmoss: the last only), yet measured faster than generate_batch(max_length=1), so it is
        # CTranslate2's best prefill here (446-512 against 510-644 tok/s, 350M shape, 2 threads)
        t0 = time.perf_counter(); gen.forward_batch([prompt_ids]); times.append(time.perf_counter() - t0)
    prefill = sorted(times)[1]
    stamps = []
    t0 = time.perf_counter()
    for step in gen.generate_tokens(prompt, max_length=new_n, min_length=new_n, sampling_topk=1):
        stamps.append(time.perf_counter())
    return prefill, (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps)
run()  # warm-up
prefill, decode, n = run()
print("RESULT " + json.dumps({"prefill_tok_s": prompt_n / prefill, "decode_tok_s": 1 / decode, "tokens": n}))
stop_for_measurement()
import os
os._exit(0)  # skip CTranslate2's teardown (it has aborted there with "terminate called without an active exception")
"""


def run_ct2(path: Path, compute: str, options: dict[str, Any]) -> Figures:
    """One CTranslate2 configuration in a fresh process; {} when it crashed (reported, not fatal)."""
    import tempfile

    from jmoss.bench import spawn_measured

    vocab, d = options["vocab_size"], options["n_embd"]
    cmd = [sys.executable, "-c", CT2_CHILD, str(path), compute, str(options["threads"]), str(options["prompt_tokens"]),
           str(max(options["decode_tokens"], 2)), str(vocab)]
    with tempfile.TemporaryFile("w+") as log:
        code, peak = spawn_measured(cmd, log=log)
        log.seek(0)
        output = log.read()
    line = next((l for l in output.splitlines() if l.startswith("RESULT ")), None)
    if code != 0 and line is not None:  # measured, then crashed on the way out: the figures stand
        print(f"ct2 {compute} exited with {code} after its result (kept): {output.strip()[-200:]}", flush=True)
    if line is None:
        print(f"ct2 {compute} run failed (exit {code}): {output.strip()[-300:]}", flush=True)
        return {}
    r = json.loads(line[7:])
    itemsize = 4 if compute == "float32" else 1
    r["bytes_per_token"] = (Path(path) / "model.bin").stat().st_size - vocab * d * itemsize
    r["peak_rss"] = peak
    return r


def run_jmoss(path: Path, options: dict[str, Any], quant_compute: str = "fp32") -> Figures:
    from jmoss.bench import run_child

    return run_child({"model": str(path), "device": "cpu", "device_memory": None, "host_memory": None,
                      "prompt_tokens": options["prompt_tokens"], "decode_tokens": options["decode_tokens"],
                      "max_seq_len": options["prompt_tokens"] + options["decode_tokens"], "name": Path(path).name},
                     env={"JMOSS_THREADS": str(options["threads"]), "JMOSS_KERNELS_QUANT_COMPUTE": quant_compute})


def default_runner(label: str, kind: str, what: str, path: Path, options: dict[str, Any]) -> Figures:
    if kind == "jmoss":
        return run_jmoss(path, options, "int8" if what.endswith(":int8") else "fp32")
    return run_ct2(path, what, options)


# Appended to a configuration's label for its runs beside busy_competitors (--competitors).
LOADED = " [loaded]"


def run_rounds(paths: dict[str, Path], options: dict[str, Any], runner=default_runner, rounds: int = 3,
               log: Callable[[str], None] = print,
               order: tuple[tuple[str, str, str], ...] = CONFIGS, competitors: bool = False) -> dict[str, list[Figures]]:
    """Every configuration of ``order`` once per round, interleaved; runs that failed ({}) are left out.

    With ``competitors`` each round runs them all twice: on the machine as it is, then again beside
    one CPU-bound process per CPU (``jmoss.bench.busy_competitors``), labelled with LOADED."""
    from jmoss.bench import busy_competitors

    conditions = (False, True) if competitors else (False,)
    runs: dict[str, list[Figures]] = {label + (LOADED if loaded else ""): [] for loaded in conditions
                                      for label, _, _ in order}
    for round_ in range(rounds):
        for loaded in conditions:
            with busy_competitors() if loaded else contextlib.nullcontext():
                for label, kind, what in order:
                    if kind == "jmoss":
                        model = paths[f"jmoss {what.split(':')[0]}"]
                    else:
                        model = paths["ct2 float32" if what == "float32" else "ct2 int8"]
                    r = runner(label, kind, what, model, options)
                    if not r:
                        continue
                    name = label + (LOADED if loaded else "")
                    runs[name].append(r)
                    log(f"round {round_ + 1} {name}: prefill {r['prefill_tok_s']:.1f} tok/s, "
                        f"decode {r['decode_tok_s']:.2f} tok/s")
    return runs


def summarize(runs: dict[str, list[Figures]]) -> list[Figures]:
    """One row per configuration: medians over its rounds (configurations with no run are left out)."""
    rows = []
    for label, rs in runs.items():
        if not rs:
            continue
        rows.append({"name": label, "rounds": len(rs),
                     "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
                     "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                     "bytes_per_token": rs[0]["bytes_per_token"],
                     "peak_rss": max((r.get("peak_rss") or 0) for r in rs) or None})
    return rows


def format_table(bound: Figures, rows: list[Figures], header: str = "") -> str:
    """The side-by-side table, then each jmoss format against CTranslate2's best decode and prefill."""
    from jmoss.sizes import format_size

    out = [header] if header else []
    out.append(f"bound: {bound['what']}: {bound['gbps']:.2f} GB/s")
    out.append("")
    out.append(f"{'run':<26}{'rounds':>7}{'prefill tok/s':>15}{'decode tok/s':>14}{'MB read/token':>15}"
               f"{'GB/s':>8}{'of bound':>10}{'peak RSS':>12}")
    for r in rows:
        gbps = r["bytes_per_token"] * r["decode_tok_s"] / 1e9
        share = f"{gbps / bound['gbps'] * 100:.0f}%" if bound["gbps"] else "-"
        rss = format_size(r["peak_rss"]) if r.get("peak_rss") else "-"
        out.append(f"{r['name']:<26}{r['rounds']:>7}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}"
                   f"{r['bytes_per_token'] / 1e6:>15.1f}{gbps:>8.2f}{share:>10}{rss:>12}")
    for loaded in (False, True):
        group = [r for r in rows if r["name"].endswith(LOADED) == loaded]
        if not group and loaded:
            break  # no --competitors
        when = "beside one busy process per CPU" if loaded else ("on the machine as it was" if len(group) < len(rows)
                                                                  else "")
        ct2 = [r for r in group if r["name"].startswith("ct2")]
        if not ct2:
            out.append(f"\nno CTranslate2 run finished{' ' + when if when else ''}: nothing to compare against")
            continue
        best_dec = max(ct2, key=lambda r: r["decode_tok_s"])
        best_pre = max(ct2, key=lambda r: r["prefill_tok_s"])
        out.append("")
        out.append(f"{when + ': ' if when else ''}best CTranslate2 decode: {best_dec['name']} "
                   f"{best_dec['decode_tok_s']:.2f} tok/s; best prefill: {best_pre['name']} {best_pre['prefill_tok_s']:.1f} tok/s")
        for r in group:
            if r["name"].startswith("jmoss"):
                out.append(f"{r['name']}: decode {r['decode_tok_s'] / best_dec['decode_tok_s']:.2f}x, "
                           f"prefill {r['prefill_tok_s'] / best_pre['prefill_tok_s']:.2f}x CTranslate2's best")
    return "\n".join(out)


def compare_ctranslate2(model: str | Path, *, prompt_tokens: int = 64, decode_tokens: int = 32, rounds: int = 3,
                        work: Path | None = None, threads: int | None = None, runner=None,
                        log: Callable[[str], None] = print, competitors: bool = False) -> str:
    """Build (once), run the interleaved rounds and return the printed report; with
    ``competitors`` every round runs each configuration quiet and then beside one CPU-bound
    process per CPU, and the report compares both ways."""
    from jmoss.bench import _default_threads, memory_bound
    from jmoss.store import Store, resolve_model

    require_ctranslate2()
    store_path = resolve_model(str(model))
    config = Store.open(store_path).config
    work = Path(work) if work is not None else work_dir(store_path)
    threads = threads or int(os.environ.get("JMOSS_THREADS") or _default_threads())
    paths = build(store_path, work, log)
    options = {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "threads": threads,
               "vocab_size": config.vocab_size, "n_embd": config.n_embd}
    from jmoss import kernels

    order = configs(int8_activations=kernels.vnni_ready() or kernels.q8_decode_ready())
    runs = run_rounds(paths, options, runner or default_runner, rounds, log, order, competitors=competitors)

    with kernels.configured(threads=threads):
        bound = memory_bound()
    import importlib.metadata

    header = (f"jmoss vs CTranslate2 {importlib.metadata.version('ctranslate2')}: {threads} threads, kernels ISA "
              f"{kernels.info()['isa']}, AMX prefill {kernels.amx_prefill()}; prompt {prompt_tokens}, decode "
              f"{decode_tokens} greedy, batch 1, median of {rounds} interleaved rounds; models in {work}")
    if competitors:
        header += (f"\n'{LOADED.strip()}' rows: each round again beside {len(os.sched_getaffinity(0))} CPU-bound "
                   "processes ('while True: pass', one per CPU), started for those runs only")
    return format_table(bound, summarize(runs), header)
