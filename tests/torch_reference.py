"""Tiny random CodeGen models from transformers: the numerical reference for jmoss's tests.

The configs keep MOSS's proportions where they matter to the math: n_head a multiple of 4 (the
fused qkv split), rotary_dim below head_dim (partial rotary; MOSS uses 64 of 256), n_inner both
default (4*n_embd) and explicit.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

from jmoss.config import MossConfig

# name -> CodeGenConfig kwargs
CONFIGS = {
    "h4-rot8": dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=2, vocab_size=257, n_positions=96),
    "h8-rot4-inner200": dict(n_embd=96, n_head=8, rotary_dim=4, n_layer=3, n_inner=200, vocab_size=300, n_positions=96),
    "h4-d64-rot16": dict(n_embd=256, n_head=4, rotary_dim=16, n_layer=2, vocab_size=512, n_positions=128),
}


def make_codegen(name: str, seed: int = 0, std: float = 0.08) -> tuple[CodeGenForCausalLM, MossConfig]:
    """A CodeGenForCausalLM with random weights (std large enough that attention is not uniform)."""
    kwargs = dict(CONFIGS[name])
    hf_config = CodeGenConfig(
        **kwargs,
        n_ctx=kwargs["n_positions"],
        initializer_range=std,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(hf_config).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0/1; randomise them too
        for name_, param in model.named_parameters():
            if name_.endswith("bias") or "ln_" in name_:
                param.add_(torch.randn_like(param) * std)
    config = MossConfig.from_dict({**kwargs, "model_type": "codegen", "bos_token_id": 0, "eos_token_id": 1})
    return model, config


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def torch_logits(model: CodeGenForCausalLM, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            mask = torch.tensor(attention_mask)
            kwargs["attention_mask"] = mask
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def torch_greedy(model: CodeGenForCausalLM, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids):].tolist()
