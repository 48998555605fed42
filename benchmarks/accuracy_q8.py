"""What the int8 compute mode (quant_compute="int8") costs in accuracy on whole packed models.

For each STORE (packed int4 / int8), one greedy generation of ``--steps`` tokens in the exact fp32
mode, then the same prompt and the fp32 mode's own tokens teacher-forced in the int8 mode (so every
step compares logits for the same context), plus a free-running int8 greedy generation:

- max |logit_int8 - logit_fp32| / max |logit_fp32| over the steps (prefill included: M >= 16 rows
  keep fp32 there unless AVX-512 VNNI runs the int8 prefill);
- steps whose argmax differs under teacher forcing, and whether the free-running greedy tokens are
  equal to the fp32 ones (first divergence printed).

    python benchmarks/accuracy_q8.py STORE [STORE ...] [--steps 32] [--prompt-tokens 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(store: str, steps: int, prompt_tokens: int) -> str:
    import jmoss
    from jmoss import kernels

    model = jmoss.load(store, device="cpu")
    prompt = [[(37 * i) % 1000 + 100 for i in range(prompt_tokens)]]

    def generate(compute: str, forced: list[int] | None) -> tuple[list[int], list[np.ndarray]]:
        with kernels.configured(quant_compute=compute):
            session = model.session(max_len=prompt_tokens + steps + 2)
            logits = [session.prefill(prompt)[0]]
            tokens: list[int] = []
            for i in range(steps):
                tok = int(np.argmax(logits[-1])) if forced is None else forced[i]
                tokens.append(int(np.argmax(logits[-1])))
                logits.append(session.decode([tok])[0])
            return tokens, logits

    ref_tokens, ref_logits = generate("fp32", None)
    forced_tokens, forced_logits = generate("int8", ref_tokens)
    free_tokens, _ = generate("int8", None)
    rel = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(forced_logits, ref_logits)]
    flips = sum(a != b for a, b in zip(forced_tokens, ref_tokens))
    same = free_tokens == ref_tokens
    first = next((i for i, (a, b) in enumerate(zip(free_tokens, ref_tokens)) if a != b), None)
    cfg = model.config
    return (f"{store}: {cfg.n_layer} layers, n_embd {cfg.n_embd}, wbits {cfg.wbits}, group {cfg.groupsize}; "
            f"kernels {kernels.isa_path()}, q8 decode {kernels.q8_decode_ready()}\n"
            f"  max rel logit error (int8 vs fp32, teacher-forced): prefill {rel[0]:.2e}, decode steps "
            f"max {max(rel[1:]):.2e} median {float(np.median(rel[1:])):.2e}\n"
            f"  argmax flips under teacher forcing: {flips}/{steps}; free-running greedy tokens equal: {same}"
            + ("" if same else f" (first divergence at step {first})"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {head}, "
          f"load average {'%.2f, %.2f, %.2f' % os.getloadavg()}")
    for store in args.stores:
        print(run(store, args.steps, args.prompt_tokens), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
