"""Chat with MOSS from the terminal — the successor of MOSS's moss_cli_demo_jittor.py.

Same options as the original demo (--model_name, --generate, --temperature, --top_p, --top_k,
--max_len, --gpu), now a thin script over jmoss's API: replies stream, the KV cache is kept across
turns, long conversations drop their oldest turns instead of crashing, and --device-memory runs
the 16B model on a card (or in RAM) smaller than its weights.

    python demos/cli_demo_jittor.py --model_name fnlp/moss-moon-003-sft --device-memory 12GiB

Convert the model once first: jmoss convert fnlp/moss-moon-003-sft
"""

from __future__ import annotations

import argparse
import os
import sys

import jmoss
from jmoss.chat_cli import run_chat
from jmoss.errors import JmossError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name", default="fnlp/moss-moon-003-sft",
                        help="converted model name or store directory (default: %(default)s)")
    parser.add_argument("--generate", choices=["sample", "greedy"], default="sample")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=40)
    parser.add_argument("--repetition_penalty", type=float, default=1.02)
    parser.add_argument("-n", "--max-new-tokens", "--max_len", dest="max_len", type=int, default=256,
                        help="maximum new tokens per reply (--max_len: MOSS's name; default 256, as jmoss chat)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: every CPU)")
    parser.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--system", default=None, help="the meta instruction (default: MOSS's)")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (default: CPU)")
    parser.add_argument("--device-memory", default=None, help="device memory budget, e.g. 12GiB")
    parser.add_argument("--host-memory", default=None, help="host memory budget for streamed layers, e.g. 24GiB")
    parser.add_argument("--offload", choices=["auto", "cpu", "stream"], default="auto",
                        help="--gpu: layers beyond --device-memory computed on the CPU (cpu), copied each token (stream), "
                             "or the faster of the two (auto)")
    parser.add_argument("--plugins", default="", help="comma-separated: calculator,solver,search")
    parser.add_argument("--show-thoughts", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = jmoss.load(args.model_name, device="cuda" if args.gpu else "cpu",
                           device_memory=args.device_memory, host_memory=args.host_memory, max_seq_len=args.ctx_size,
                           offload=args.offload, threads=args.threads)
        meta = None if args.system is None else args.system if args.system.endswith("\n") else args.system + "\n"
        run_chat(model, [p for p in args.plugins.split(",") if p], {}, args.show_thoughts,
                 dict(do_sample=args.generate == "sample", temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_len),
                 meta_instruction=meta)
    except JmossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
