"""Prompt-lookup speculative decoding: what a verify pass costs, what it gains, and what MOSS's data predicts.

Three measurements, each a subcommand (``all`` runs the three and prints one record):

``passes STORE``   the time of one forward pass of r = 1, 2, 4, 8 (and 3, 5, 9) rows on a one-row
                   session after a prompt, relative to r = 1, measured interleaved in one process, with
                   the fused one-op layer (kernels.decode_block, <= 16 rows) and with the per-op path
                   (the prefill kernels one op at a time). On the 16B int4 CPU store this is the cost
                   side of lookup: a pass of k+1 rows against the one-row pass it replaces.
``forced STORE``   decode tok/s with lookup against without, same process, on that store's model with
                   its logits forced so that each pass's drafts are 3 of 4 accepted (the drafter
                   proposes 4, the target agrees with the first 3): the speed-up the pass cost allows
                   at that acceptance.
``replay``         MOSS's recorded plugin conversations (shared/reference) replayed as if the model
                   had produced them, tokenized with MOSS's tokenizer: per generated span (plugin pass
                   1, Inner Thoughts + Commands; pass 2, the reply), the drafter runs on the context as
                   jmoss.generation would, the target's tokens being the recorded ones; reports mean
                   tokens per pass and, with the pass costs (``--costs`` or measured by ``passes``),
                   the expected decode speed-up per conversation kind.

    flock /work/heavy.lock python benchmarks/bench_lookup.py all /path/to/moss16b-int4 > benchmarks/results/lookup-cpu-16b-int4.txt

Replay is greedy acceptance: a recorded token is what the target "produces"; with sampling a draft
token is accepted with probability p_target(draft) instead, so fewer drafts are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jmoss.lookup import MAX_NGRAM, MIN_NGRAM, PromptLookup  # noqa: E402

SHARED = Path(os.environ.get("JMOSS_SHARED", ROOT.parent / "shared"))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------
# replay
# ----------------------------------------------------------------------------------------------


def moss_tokenizer(shared: Path):
    """MOSS's tokenizer from the shared assets (the reconstructed vocab, as tests/moss_fixtures does)."""
    from jmoss.tokenizer import load_tokenizer

    out = Path(tempfile.mkdtemp(prefix="jmoss-tok-"))
    int8 = shared / "assets" / "moss-moon-003-sft-int8"
    shutil.copy(int8 / "vocab.reconstructed.json", out / "vocab.json")
    for name in ("merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(int8 / name, out / name)
    shutil.copy(shared / "assets" / "moss-moon-003-sft-int4" / "tokenizer_config.json", out / "tokenizer_config.json")
    return load_tokenizer(out)


@dataclass
class Span:
    """One generated span: the context before it and the tokens the model wrote (stop token included)."""

    kind: str
    context: list[int]
    reply: list[int]


def conversation_spans(record: dict, tok) -> list[Span]:
    """The spans a plugin chat (jmoss.chat) generates in one recorded conversation, with their contexts.

    Pass 1 writes ``<|Inner Thoughts|>: …<eot>\\n<|Commands|>: …<eoc>`` after the Human field;
    pass 2 writes the reply after ``<|MOSS|>:``. Each piece is tokenized on its own, as the chat
    appends it. Kind: "plain" for a turn that calls no tool (Commands None), "plugin" otherwise,
    with the tool folder (calculator, web_search, ...) after a slash.
    """
    folder = record["source"].split("/")[3]
    ids = tok.encode(record["meta_instruction"])
    spans = []
    for k in range(1, record["num_turns"] + 1):
        turn = record["chat"][f"turn_{k}"]
        ids += tok.encode(turn["Human"])
        commands = turn["Commands"]
        calls = commands.split(":", 1)[1].strip()
        calls = calls[: -len("<eoc>\n")] if calls.endswith("<eoc>\n") else calls
        kind = "plain" if calls.rstrip(". ").startswith("None") or calls.startswith("Non") and len(calls) < 8 else "plugin"
        pass1 = turn["Inner Thoughts"] + commands
        assert pass1.endswith("<eoc>\n"), pass1[-20:]
        gen1 = tok.encode(pass1[: -1])  # the chat closes the field with "\n" itself
        spans.append(Span(f"{kind}/{folder}/pass1", list(ids), gen1))
        ids += gen1 + tok.encode("\n")
        ids += tok.encode(turn["Tool Responses"] + "<|MOSS|>:")
        reply = turn["MOSS"]
        assert reply.startswith("<|MOSS|>:") and reply.endswith("<eom>\n"), reply[-20:]
        gen2 = tok.encode(reply[len("<|MOSS|>:") : -1])
        spans.append(Span(f"{kind}/{folder}/pass2", list(ids), gen2))
        ids += gen2 + tok.encode("\n")
    return spans


def code_spans(tok, files: list[Path]) -> list[Span]:
    """A proxy for code replies (MOSS's plugin data has none): each file's second half as the reply
    to its first half, as if a model continued or rewrote the file."""
    spans = []
    for path in files:
        ids = tok.encode(path.read_text(encoding="utf-8"))[:2048]
        half = len(ids) // 2
        spans.append(Span(f"code/{path.name}/continue", ids[:half], ids[half:]))
    return spans


@dataclass
class Tally:
    tokens: int = 0  # generated tokens after the first (the first comes from the prompt's pass)
    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    rows: dict[int, int] = field(default_factory=dict)  # passes by rows (1 + drafts)

    def add(self, other: "Tally") -> None:
        self.tokens += other.tokens
        self.passes += other.passes
        self.drafted += other.drafted
        self.accepted += other.accepted
        for r, n in other.rows.items():
            self.rows[r] = self.rows.get(r, 0) + n

    def cost(self, costs: dict[int, float]) -> float:
        return sum(n * _cost_at(costs, r) for r, n in self.rows.items())


def _cost_at(costs: dict[int, float], rows: int) -> float:
    """A pass's cost relative to one row, interpolated linearly between measured row counts."""
    if rows in costs:
        return costs[rows]
    known = sorted(costs)
    lo = max((r for r in known if r < rows), default=known[0])
    hi = min((r for r in known if r > rows), default=known[-1])
    if hi == lo:
        return costs[lo]
    return costs[lo] + (costs[hi] - costs[lo]) * (rows - lo) / (hi - lo)


def replay_span(span: Span, k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> Tally:
    """Passes jmoss.generation would run for this span with up to ``k`` drafts each, the target's
    tokens being the recorded ones (greedy acceptance: a draft is kept while it equals them)."""
    reply, m = span.reply, len(span.reply)
    tally = Tally(tokens=max(0, m - 1))
    drafter = PromptLookup(span.context + reply[:1], max_ngram=max_ngram, min_ngram=min_ngram)
    i = 1  # tokens emitted; the first came from the prompt's own pass
    while i < m:
        draft = drafter.propose(min(k, m - 1 - i)) if k else []  # no draft past the last token
        accepted = 0
        while accepted < len(draft) and draft[accepted] == reply[i + accepted]:
            accepted += 1
        tally.passes += 1
        tally.drafted += len(draft)
        tally.accepted += accepted
        tally.rows[1 + len(draft)] = tally.rows.get(1 + len(draft), 0) + 1
        step = min(accepted + 1, m - i)
        drafter.extend(reply[i : i + step])
        i += step
    return tally


def run_replay(args, costs: dict[int, float] | None) -> None:
    tok = moss_tokenizer(args.shared)
    records = [json.loads(line) for line in open(args.shared / "reference" / "moss_plugin_conversations.jsonl")]
    spans = [s for r in records for s in conversation_spans(r, tok)]
    code_files = sorted((ROOT / "jmoss").glob("*.py"))
    spans += code_spans(tok, code_files)
    print(f"replay: {len(records)} recorded MOSS plugin conversations, {len(spans) - len(code_files)} generated spans "
          f"({sum(len(s.reply) for s in spans[:-len(code_files)])} tokens); code proxy: {len(code_files)} jmoss/*.py files "
          "(second half as the reply to the first; MOSS's plugin data holds no code replies)")

    def groups(span: Span) -> list[str]:
        kind, folder, which = span.kind.split("/")
        if kind == "code":
            return [kind]
        out = [kind, f"{kind} {which}"]
        if kind == "plugin":
            out.append(f"plugin/{folder}")
        return out

    names = ["plain", "plain pass1", "plain pass2", "plugin", "plugin pass1", "plugin pass2"]
    names += sorted({g for s in spans for g in groups(s) if g.startswith("plugin/")})
    names += ["code"]

    print(f"\nsettings: max n-gram {args.max_ngram}, min n-gram {args.min_ngram}; tokens/pass = generated tokens "
          "after the first / passes (plain decode: 1.00)")
    ks = [int(x) for x in args.ks.split(",")]
    header = f"{'kind':<24}{'spans':>6}{'tokens':>8}" + "".join(f"{'k=' + str(k):>9}" for k in ks)
    print("\nmean tokens per pass\n" + header)
    tallies = {(name, k): Tally() for name in names for k in ks}
    counts = {name: [0, 0] for name in names}
    for s in spans:
        for k in ks:
            t = replay_span(s, k, args.max_ngram, args.min_ngram)
            for g in groups(s):
                tallies[(g, k)].add(t)
        for g in groups(s):
            counts[g][0] += 1
            counts[g][1] += len(s.reply)
    for name in names:
        row = f"{name:<24}{counts[name][0]:>6}{counts[name][1]:>8}"
        for k in ks:
            t = tallies[(name, k)]
            row += f"{t.tokens / max(1, t.passes):>9.2f}"
        print(row)
    print("\ndraft acceptance (accepted / drafted tokens)\n" + header)
    for name in names:
        row = f"{name:<24}{counts[name][0]:>6}{counts[name][1]:>8}"
        for k in ks:
            t = tallies[(name, k)]
            row += f"{t.accepted / max(1, t.drafted):>9.2f}"
        print(row)
    if costs:
        print("\nexpected decode speed-up = plain passes x cost(1) / sum of lookup pass costs, with pass cost "
              "relative to one row: " + ", ".join(f"{r}: {c:.3f}" for r, c in sorted(costs.items())))
        print(header)
        for name in names:
            row = f"{name:<24}{counts[name][0]:>6}{counts[name][1]:>8}"
            for k in ks:
                t = tallies[(name, k)]
                row += f"{t.tokens / max(1e-9, t.cost(costs)):>9.2f}"
            print(row)


# ----------------------------------------------------------------------------------------------
# passes: what a verify pass of r rows costs against a one-row decode pass
# ----------------------------------------------------------------------------------------------


def run_passes(model, rows: list[int], reps: int, prompt_len: int,
               computes: tuple[str, ...] = ("fp32",)) -> dict[str, dict[int, float]]:
    """Median seconds of a one-row session's forward of r tokens (Session.verify: every position's
    logits, as lookup runs it), fused one-op layer and per-op path (and each kernels quant_compute
    mode in ``computes``), interleaved round by round."""
    from jmoss import kernels
    from jmoss.kernels import cpu as kernels_cpu

    session = model.session(max_len=prompt_len + max(rows) + 8)
    session.prefill([[(37 * i) % 50000 + 100 for i in range(prompt_len)]])
    fused_rows = kernels_cpu.FUSED_MAX_ROWS
    paths = {name + (f" {c}" if computes != ("fp32",) else ""): (limit, c)
             for c in computes for name, limit in (("fused", fused_rows), ("per-op", 0))}
    times: dict[str, dict[int, list[float]]] = {p: {r: [] for r in rows} for p in paths}
    for rep in range(reps + 1):  # the first round warms up (kernel compiles, page cache) and is dropped
        for path, (limit, compute) in paths.items():
            kernels_cpu.FUSED_MAX_ROWS = limit
            try:
                with kernels.configured(quant_compute=compute):
                    for r in rows:
                        start = session.length
                        t0 = time.perf_counter()
                        session.verify([[(11 * j) % 50000 + 200 for j in range(r)]])
                        dt = time.perf_counter() - t0
                        session.truncate(start)
                        if rep:
                            times[path][r].append(dt)
            finally:
                kernels_cpu.FUSED_MAX_ROWS = fused_rows
    return {p: {r: statistics.median(v) for r, v in by.items()} for p, by in times.items()}


def print_passes(med: dict[str, dict[int, float]]) -> dict[int, float]:
    """Print the pass-cost table; return the best path's cost relative to its own one-row pass."""
    base = min(m[1] for m in med.values())
    print("\npass cost: median seconds of one forward of r rows on a one-row session (every position's logits), "
          "and relative to the fastest 1-row pass")
    print(f"{'rows':>5}" + "".join(f"{p + ' s':>16}{p + ' x':>14}" for p in med))
    for r in sorted(next(iter(med.values()))):
        print(f"{r:>5}" + "".join(f"{m[r]:>16.4f}{m[r] / base:>14.3f}" for m in med.values()))
    print("each path relative to its own 1-row pass:")
    for p, m in med.items():
        print(f"  {p:>16}: " + "  ".join(f"{r} rows {m[r] / m[1]:.2f}x" for r in sorted(m) if 1 in m))
    best = {r: min(m[r] for m in med.values()) / base for r in next(iter(med.values()))}
    return best


# ----------------------------------------------------------------------------------------------
# forced: decode tok/s with and without lookup when 3 of every 4 drafts are accepted
# ----------------------------------------------------------------------------------------------


def three_of_four(entries: int, base: int = 1000) -> tuple[list[int], list[int]]:
    """A prompt of entries [k_i, v_i1, v_i2, v_i3, u_i] (all ids distinct) and a target that writes
    k_1 v_11 v_12 v_13 k_2 v_21 ...: each pass's pending k_i is found once in the prompt (its only
    earlier occurrence), the drafter proposes v_i1 v_i2 v_i3 u_i, the target accepts 3 and writes
    k_{i+1} instead of u_i, which is the next pass's fed token. So every pass feeds 5 rows and
    yields 4 tokens."""
    entry = [[base + 5 * i + j for j in range(5)] for i in range(entries)]
    prompt = [t for e in entry for t in e]
    target = [t for e in entry for t in e[:4]]
    return prompt, target


def run_forced(model, decode_tokens: int, rounds: int) -> list[tuple[str, float, int, int]]:
    """Decode tok/s of the forced target with lookup off and with lookup=4, interleaved; each
    generation's first token (from the prompt's pass) is left out of the rate."""
    from jmoss.generation import GenerationOptions, generate_ids
    from jmoss.lookup import LookupStats

    prompt, target = three_of_four(decode_tokens // 4 + 2)

    def rule(history: tuple[int, ...]) -> int:
        i = len(history) - len(prompt)
        return target[i] if 0 <= i < len(target) and list(history[len(prompt):]) == target[:i] else target[0]

    sys.path.insert(0, str(ROOT / "tests"))
    from forced_model import forced

    model = forced(model, rule)
    results = []
    for rep in range(rounds + 1):
        for lookup in ("off", 4):
            session = model.session(max_len=len(prompt) + decode_tokens + 8)
            stats = LookupStats()
            opts = GenerationOptions(do_sample=False, lookup=lookup, max_new_tokens=decode_tokens,
                                     repetition_penalty=1.0)
            out, stamps = [], []
            for step in generate_ids(model, session, [prompt], opts, stats=stats):
                out.append(step[0])
                stamps.append(time.perf_counter())
            assert out == target[:decode_tokens], "the forced target was not followed"
            if rep:
                rate = (len(out) - 1) / (stamps[-1] - stamps[0])
                results.append((str(lookup), rate, stats.passes, stats.accepted))
    return results


# ----------------------------------------------------------------------------------------------
# main

# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    replay = sub.add_parser("replay", help="replay MOSS's recorded replies through the drafter")
    replay.add_argument("--costs", default="", help="pass costs relative to 1 row, e.g. 1:1,2:1.05,4:1.1,8:1.3")
    passes = sub.add_parser("passes", help="cost of an r-row verify pass relative to 1 row")
    forced_cmd = sub.add_parser("forced", help="tok/s with lookup vs without at 3 of 4 drafts accepted")
    everything = sub.add_parser("all", help="passes, forced and replay with the measured costs")
    for p in (passes, forced_cmd, everything):
        p.add_argument("store", help="a converted store (the 16B int4 CPU store for the record)")
        p.add_argument("--device-memory", default=None, help="budget (default: everything resident)")
        p.add_argument("--rows", default="1,2,3,4,5,8,9")
        p.add_argument("--reps", type=int, default=5)
        p.add_argument("--prompt-tokens", type=int, default=128)
        p.add_argument("--decode-tokens", type=int, default=32)
        p.add_argument("--rounds", type=int, default=2)
        p.add_argument("--compute", default="fp32",
                       help="passes: kernels quant_compute modes side by side, comma-separated (fp32, int8)")
    for p in (replay, everything):
        p.add_argument("--shared", type=Path, default=SHARED)
        p.add_argument("--ks", default="1,2,3,4,6,8")
        p.add_argument("--max-ngram", type=int, default=MAX_NGRAM)
        p.add_argument("--min-ngram", type=int, default=MIN_NGRAM)
    args = parser.parse_args()
    print(f"jmoss bench_lookup {args.cmd}: {_cpu()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, "
          f"commit {_commit()}, {_load()}")
    if args.cmd == "replay":
        costs = {int(a): float(b) for a, b in (x.split(":") for x in args.costs.split(",") if x)} or None
        run_replay(args, costs)
        return
    import jmoss
    from jmoss.kernels import info

    t0 = time.perf_counter()
    model = jmoss.load(args.store, device="cpu", device_memory=args.device_memory)
    plan = model.plan
    print(f"model {args.store}: {model.config.n_layer} layers, n_embd {model.config.n_embd}, "
          f"wbits {model.config.wbits}, loaded in {time.perf_counter() - t0:.1f} s; kernels {info()['isa']}, "
          f"{info()['threads']} threads; {'streaming ' + str(plan.disk_bytes_per_token) + ' B/token' if plan and plan.streams else 'resident'}")
    costs = None
    if args.cmd in ("passes", "all"):
        med = run_passes(model, [int(r) for r in args.rows.split(",")], args.reps, args.prompt_tokens,
                         tuple(c.strip() for c in args.compute.split(",") if c.strip()))
        costs = print_passes(med)
        print(_load())
    if args.cmd in ("forced", "all"):
        results = run_forced(model, args.decode_tokens, args.rounds)
        print(f"\nforced target, 3 of every 4 drafts accepted ({args.decode_tokens} tokens per generation, "
              f"{args.rounds} interleaved rounds):")
        for lookup, rate, passes, accepted in results:
            print(f"  lookup {lookup:>3}: {rate:7.3f} tok/s decode, {passes} passes, {accepted} drafts accepted")
        off = statistics.median(r for l, r, _, _ in results if l == "off")
        on = statistics.median(r for l, r, _, _ in results if l != "off")
        print(f"  speed-up (median of rounds): {on / off:.2f}x  ({_load()})")
    if args.cmd == "all":
        run_replay(args, costs)


if __name__ == "__main__":
    main()
