"""A tiny random model with MOSS's vocabulary, special ids and real tokenizer files.

The weights are random (a 2-layer CodeGen from transformers), but everything around them — the
107008-row vocabulary, <eom> = 106068 as eos, MOSS's merges and added tokens — is MOSS's, so
generation, stop handling and chat formatting are exercised as with the real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

from jmoss.config import MossConfig

MOSS_EOM = 106068
MOSS_BOS = 106028
TINY_MOSS = dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=2, vocab_size=107008, n_positions=1024)


def moss_tokenizer_dir(shared: Path, out: Path) -> Path:
    """MOSS's tokenizer files as a store would hold them (the reconstructed vocab as vocab.json)."""
    out.mkdir(parents=True, exist_ok=True)
    int8 = shared / "assets" / "moss-moon-003-sft-int8"
    shutil.copy(int8 / "vocab.reconstructed.json", out / "vocab.json")
    for name in ("merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(int8 / name, out / name)
    shutil.copy(shared / "assets" / "moss-moon-003-sft-int4" / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def tiny_moss(seed: int = 0, std: float = 0.08, **overrides) -> tuple[CodeGenForCausalLM, MossConfig]:
    kwargs = {**TINY_MOSS, **overrides}
    hf_config = CodeGenConfig(**kwargs, n_ctx=kwargs["n_positions"], initializer_range=std,
                              bos_token_id=MOSS_BOS, eos_token_id=MOSS_EOM, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                param.add_(torch.randn_like(param) * std)
    config = MossConfig.from_dict({**kwargs, "model_type": "moss", "bos_token_id": MOSS_BOS, "eos_token_id": MOSS_EOM})
    return model, config


def write_hf_config(config: MossConfig, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
