"""Build a CodeGen-350M-shaped jmoss store with random weights (the `--compare torch` benchmark model).

The shape is shared/assets/codegen-350M-mono/config.json (n_embd 1024, 20 layers, 16 heads,
rotary 32, vocab 51200): 304M parameters, 0.61 GB in fp16 without the embedding table. Weights
come from transformers' own random init of CodeGenForCausalLM, so the store is exactly what
``jmoss convert`` would write for a real CodeGen checkpoint of that shape, tokenizer files included.

    python benchmarks/make_codegen350m_store.py [OUT]   # default $JMOSS_HOME/bench-stores/codegen-350M-random
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ASSETS = Path(os.environ.get("JMOSS_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets/codegen-350M-mono"


def build(out: Path, assets: Path = ASSETS, seed: int = 0) -> Path:
    """Random-init CodeGenForCausalLM of the 350M config, split into store groups, written as fp16."""
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    from jmoss.config import MossConfig
    from jmoss.layout import split_state_dict
    from jmoss.store import write_store_from_groups

    raw = json.loads((assets / "config.json").read_text())
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(CodeGenConfig.from_dict(raw)).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = MossConfig.from_dict(raw)
    groups = split_state_dict(state, config, dtype="float16")
    return write_store_from_groups(out, config, groups, tokenizer_dir=assets,
                                   source={"id": "random-init codegen-350M-mono shape", "seed": seed})


def main() -> None:
    from jmoss.jittor_setup import jmoss_home

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=jmoss_home() / "bench-stores" / "codegen-350M-random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
