"""Constrained decoding: what a JSON schema costs per token, and why llguidance (jmoss.constraints).

    python benchmarks/bench_constraints.py STORE [--tokens 64] [--rounds 3] [--libraries]

1. Decode on STORE (the CodeGen-350M shape: benchmarks/make_codegen350m_store.py) without a
   constraint and under two JSON schemas, interleaved in one process, ``--rounds`` times, the
   median reported: decode tok/s from the model's own stats (mean time per token after the first),
   and the time spent on the mask (computing it, applying it to the logits, advancing the matcher)
   per token, measured in the same steps. The schemas keep the model writing for ``--tokens`` steps: a long
   string (most tokens allowed) and an array of integers (few allowed).
2. ``--libraries``: llguidance against xgrammar on the same tokenizer and schemas, one thread:
   tokenizer set-up, per-schema compile, and mask time along random walks. xgrammar is not a
   jmoss dependency (it needs torch, transformers, triton): give its folder with ``--xgrammar-path``.

Prints a table and appends nothing: save the output under benchmarks/results/ with `uptime`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCHEMAS = {
    "long string": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
                    "additionalProperties": False},
    "integer array": {"type": "array", "items": {"type": "integer"}},
}
WALK_SCHEMAS = {
    **SCHEMAS,
    "nested record": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b\"c", "d"]}, "maxItems": 4},
        "point": {"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.25}},
                  "required": ["x"], "additionalProperties": False}},
        "required": ["name", "age", "tags", "point"], "additionalProperties": False},
}


class TimedMask:
    """Wraps a row's TokenMask and adds up the seconds spent in it (mask, advance)."""

    seconds = 0.0
    calls = 0

    def __init__(self, inner):
        self.inner = inner

    @property
    def done(self) -> bool:
        return self.inner.done

    def mask(self):
        t = time.perf_counter()
        out = self.inner.mask()
        TimedMask.seconds += time.perf_counter() - t
        TimedMask.calls += 1
        return out

    def advance(self, token: int) -> None:
        t = time.perf_counter()
        self.inner.advance(token)
        TimedMask.seconds += time.perf_counter() - t

    def rollback(self, n: int) -> None:
        self.inner.rollback(n)


class TimedConstraint:
    def __init__(self, inner):
        self.inner = inner

    def start(self):
        return TimedMask(self.inner.start())


def decode_rounds(store: Path, tokens: int, rounds: int) -> list[dict]:
    """Per configuration: decode tok/s (median over rounds) and mask seconds per token."""
    import jmoss
    import jmoss.generation as generation

    masked = generation._masked

    def timed_masked(scores, allowed):  # the sampler's step that applies the mask, counted with the mask
        t = time.perf_counter()
        out = masked(scores, allowed)
        TimedMask.seconds += time.perf_counter() - t
        return out

    generation._masked = timed_masked
    model = jmoss.load(store, device="cpu")
    prompt = "def main():\n    data = "
    configs = {"no constraint": None, **{name: model.json_constraint(s) for name, s in SCHEMAS.items()}}
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in configs}
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm the kernels
    for _ in range(rounds):
        for name, constraint in configs.items():
            TimedMask.seconds, TimedMask.calls = 0.0, 0
            before = model.stats.snapshot()
            opts = dict(max_new_tokens=tokens, do_sample=True, temperature=1.0, top_p=1.0, seed=1,
                        repetition_penalty=1.0)
            if constraint is not None:
                opts["constraint"] = TimedConstraint(constraint)
            model.generate(prompt, **opts)
            after = model.stats.snapshot()
            n = after["completion_tokens"] - before["completion_tokens"]
            tpot = (after["tpot_sum"] - before["tpot_sum"]) / max(1, after["tpot_count"] - before["tpot_count"])
            results[name].append((1.0 / tpot, TimedMask.seconds / max(1, TimedMask.calls), n))
    rows = []
    for name, runs in results.items():
        rows.append({"config": name, "decode_tok_s": statistics.median(r[0] for r in runs),
                     "mask_ms_per_token": 1000 * statistics.median(r[1] for r in runs),
                     "tokens": statistics.median(r[2] for r in runs)})
    return rows


def library_walks(tokenizer, steps: int = 64, walks: int = 5, xgrammar_path: str | None = None) -> list[dict]:
    """llguidance and xgrammar on the same vocabulary: set-up, compile per schema, mask time per step."""
    rows = []
    n = tokenizer.vocab_size
    eos = tokenizer.eos_token_id

    def walk(first_mask, advance, schema_name: str) -> tuple[float, int]:
        rng = np.random.default_rng(0)
        times = []
        for _ in range(walks):
            state = first_mask()
            for _ in range(steps):
                t = time.perf_counter()
                allowed = state["mask"]()
                times.append(time.perf_counter() - t)
                token = int(rng.choice(np.flatnonzero(allowed)))
                if token == eos or not advance(state, token):
                    break
        return statistics.median(times) * 1000, len(times)

    # llguidance, as jmoss uses it
    from jmoss.constraints import grammar_tokenizer, json_schema

    t = time.perf_counter()
    grammar_tokenizer(tokenizer, eos)
    setup = time.perf_counter() - t
    for name, schema in WALK_SCHEMAS.items():
        t = time.perf_counter()
        c = json_schema(tokenizer, schema, eos_token_id=eos)
        c.start()
        compile_s = time.perf_counter() - t

        def first():
            m = c.start()
            return {"m": m, "mask": m.mask}

        def advance(state, token):
            state["m"].advance(token)
            return not state["m"].done

        ms, count = walk(first, advance, name)
        rows.append({"library": f"llguidance {_version('llguidance')}", "schema": name, "setup_s": setup,
                     "compile_s": compile_s, "mask_ms": ms, "steps": count})
    if xgrammar_path:
        sys.path.append(xgrammar_path)
    try:
        import xgrammar as xgr
    except ImportError:
        return rows
    t = time.perf_counter()
    vocab = [tokenizer.decode_bytes([i]) for i in range(n)]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=n, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t
    for name, schema in WALK_SCHEMAS.items():
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        compile_s = time.perf_counter() - t
        bitmask = xgr.allocate_token_bitmask(1, n)

        def first():
            m = xgr.GrammarMatcher(compiled)

            def mask():
                m.fill_next_token_bitmask(bitmask)
                return np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:n].view(bool)

            return {"m": m, "mask": mask}

        def advance(state, token):
            return state["m"].accept_token(token) and not state["m"].is_terminated()

        ms, count = walk(first, advance, name)
        rows.append({"library": f"xgrammar {_version('xgrammar')}", "schema": name, "setup_s": setup,
                     "compile_s": compile_s, "mask_ms": ms, "steps": count})
    return rows


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--libraries", action="store_true", help="also compare llguidance and xgrammar")
    parser.add_argument("--no-decode", action="store_true", help="only the library comparison")
    parser.add_argument("--xgrammar-path", default=None, help="a folder holding xgrammar (not a jmoss dependency)")
    parser.add_argument("--tokenizer", type=Path, action="append", default=[],
                        help="--libraries: also on this tokenizer folder (e.g. MOSS's files; repeatable)")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"# bench_constraints: {_cpu_name()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"commit {commit}, load average {os.getloadavg()[0]:.2f} at start")
    rows = [] if args.no_decode else decode_rounds(args.store, args.tokens, args.rounds)
    if rows:
        base = rows[0]["decode_tok_s"]
        print(f"\nDecode on {args.store.name}, up to {args.tokens} tokens, sampled, median of {args.rounds} "
              "interleaved rounds")
        print(f"{'configuration':<16}{'decode tok/s':>14}{'vs none':>9}{'mask ms/token':>15}{'mask share':>12}"
              f"{'tokens':>8}")
        for r in rows:
            share = r["mask_ms_per_token"] / (1000 / r["decode_tok_s"]) if r["config"] != "no constraint" else 0.0
            print(f"{r['config']:<16}{r['decode_tok_s']:>14.2f}{r['decode_tok_s'] / base:>9.3f}"
                  f"{r['mask_ms_per_token']:>15.3f}{100 * share:>11.1f}%{r['tokens']:>8.0f}")
    if args.libraries:
        import jmoss

        for folder in [args.store, *args.tokenizer]:
            tok = jmoss.load_tokenizer(folder)
            lib_rows = library_walks(tok, xgrammar_path=args.xgrammar_path)
            print(f"\nGrammar libraries on {folder.name}'s tokenizer ({tok.vocab_size} ids), random walks, one thread")
            print(f"{'library':<18}{'schema':<16}{'set-up s':>10}{'compile ms':>12}{'mask ms':>10}{'steps':>7}")
            for r in lib_rows:
                print(f"{r['library']:<18}{r['schema']:<16}{r['setup_s']:>10.2f}{1000 * r['compile_s']:>12.1f}"
                      f"{r['mask_ms']:>10.3f}{r['steps']:>7}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
