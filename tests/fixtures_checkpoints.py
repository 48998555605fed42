"""Tiny real checkpoints for the converter tests, written by torch / transformers themselves.

- ``tiny_model``: a random transformers ``CodeGenForCausalLM`` whose weights are rounded to
  fp16 values (kept in fp32), so an fp16 store reproduces the torch model exactly.
- ``save_torch_shards``: ``torch.save`` shards in the Hugging Face layout with an index, fp16,
  with MOSS's per-layer ``causal_mask`` buffers (uint8 [1, 1, n_pos, n_pos]); transformers 5
  only writes safetensors, and its CodeGen has no causal_mask buffer, so we add them as MOSS's
  shards have them.
- ``save_safetensors``: ``save_pretrained`` output (sharded with an index on request).
- ``gptq_pack`` / ``save_gptq_checkpoint``: GPTQ int4/int8 packed straight from moss-spec §2.2-2.3
  (written independently of converters/gptq.py so the test checks one against the other).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

TOKENIZER_FILES = {
    "vocab.json": json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}),
    "merges.txt": "#version: 0.2\na b\n",
    "special_tokens_map.json": json.dumps({"eos_token": "<|endoftext|>"}),
    "tokenizer_config.json": json.dumps({"model_max_length": 64}),
}


def tiny_config(**overrides) -> CodeGenConfig:
    values = dict(
        vocab_size=300, n_positions=64, n_ctx=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
        n_inner=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    values.update(overrides)
    return CodeGenConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> CodeGenForCausalLM:
    """A random CodeGen model in fp32 whose every weight is exactly representable in fp16."""
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.ndim == 1 else 0.08)  # LN/bias spread too, so mixing-up shows
            p.copy_(p.half().float())
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def write_config(model: CodeGenForCausalLM, out: Path, **extra) -> None:
    data = model.config.to_dict()
    data.update(extra)
    (out / "config.json").write_text(json.dumps(data, indent=2))


def write_tokenizer(out: Path) -> None:
    for name, text in TOKENIZER_FILES.items():
        (out / name).write_text(text)


def _causal_mask(n_positions: int) -> torch.Tensor:
    return torch.tril(torch.ones(n_positions, n_positions, dtype=torch.uint8)).view(1, 1, n_positions, n_positions)


def moss_state_dict(model: CodeGenForCausalLM, dtype: torch.dtype = torch.float16, causal_mask: bool = True) -> dict[str, torch.Tensor]:
    """The state dict as MOSS's shards hold it: fp16 weights plus a causal_mask per layer."""
    sd: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        sd[name] = value.to(dtype).contiguous()
        if causal_mask and name.endswith(".attn.qkv_proj.weight"):
            sd[name.replace("qkv_proj.weight", "causal_mask")] = _causal_mask(model.config.n_positions)
    return sd


def save_sharded_state_dict(sd: dict[str, torch.Tensor], out: Path, n_shards: int, index: bool = True) -> list[Path]:
    """torch.save ``sd`` as HF-style ``pytorch_model-0000k-of-0000n.bin`` shards (+ index)."""
    names = list(sd)
    per = -(-len(names) // n_shards)
    files, weight_map, total = [], {}, 0
    for k in range(n_shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin" if n_shards > 1 else "pytorch_model.bin"
        part = {n: sd[n] for n in names[k * per : (k + 1) * per]}
        torch.save(part, out / fname)
        files.append(out / fname)
        for n, v in part.items():
            weight_map[n] = fname
            total += v.numel() * v.element_size()
    if index:
        (out / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return files


def save_torch_shards(model: CodeGenForCausalLM, out: Path, n_shards: int = 3, index: bool = True, dtype=torch.float16) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_config(model, out)
    write_tokenizer(out)
    save_sharded_state_dict(moss_state_dict(model, dtype), out, n_shards, index)
    return out


def save_safetensors(model: CodeGenForCausalLM, out: Path, max_shard_size: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    write_tokenizer(out)
    return out


def gptq_pack(weight: np.ndarray, bits: int, groupsize: int, rng: np.random.Generator, act_order: bool = True):
    """Quantize an [out, in] weight GPTQ-style and pack it as moss-spec §2.2-2.3 describe.

    Returns (tensors, dequantized): tensors holds qweight/qzeros/scales/g_idx; dequantized is
    the fp16 [out, in] matrix scales*(q - zero) the packed values stand for.
    """
    out_f, in_f = weight.shape
    maxq, pack = 2**bits - 1, 32 // bits
    groups = -(-in_f // groupsize)
    g_idx = (rng.permutation(in_f) // groupsize if act_order else np.arange(in_f) // groupsize).astype(np.int32)
    scales = np.zeros((groups, out_f), np.float16)
    zeros = np.zeros((groups, out_f), np.int64)
    q = np.zeros((in_f, out_f), np.int64)
    for g in range(groups):
        cols = np.nonzero(g_idx == g)[0]
        w = weight[:, cols].astype(np.float32)
        lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
        scale = np.maximum((hi - lo) / maxq, 1e-4).astype(np.float16)
        zero = np.clip(np.round(-lo / scale.astype(np.float32)), 1, maxq).astype(np.int64)  # >=1: see spec §2.5
        scales[g], zeros[g] = scale, zero
        q[cols] = np.clip(np.round(w / scale.astype(np.float32)[:, None] + zero[:, None]), 0, maxq).T
    dequant = np.empty((out_f, in_f), np.float16)
    for k in range(in_f):
        g = g_idx[k]
        dequant[:, k] = (scales[g].astype(np.float32) * (q[k] - zeros[g])).astype(np.float16)
    qweight = np.zeros((in_f // pack, out_f), np.uint32)
    for j in range(pack):
        qweight |= (q[j::pack].astype(np.uint32) << np.uint32(bits * j))
    qzeros = np.zeros((groups, out_f // pack), np.uint32)
    for j in range(pack):
        qzeros |= ((zeros[:, j::pack] - 1).astype(np.uint32) << np.uint32(bits * j))
    tensors = {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scales, "g_idx": g_idx}
    return tensors, dequant


QUANTIZED = ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")


def save_gptq_checkpoint(model: CodeGenForCausalLM, out: Path, bits: int, groupsize: int = 32, seed: int = 0, config_wbits: int | None = None):
    """A single-file ``pytorch_model.bin`` like moss-moon-003-sft-int4: GPTQ Linears + fp16 rest.

    Returns (folder, {hf weight name: expected fp16 dequantized [out, in]}).
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_config(model, out, wbits=config_wbits or bits, groupsize=groupsize)
    write_tokenizer(out)
    sd: dict[str, torch.Tensor] = {}
    expected: dict[str, np.ndarray] = {}
    for name, value in moss_state_dict(model).items():
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and base.split(".", 3)[-1] in QUANTIZED:
            tensors, dequant = gptq_pack(value.float().numpy(), bits, groupsize, rng)
            for suffix, array in tensors.items():
                sd[f"{base}.{suffix}"] = torch.from_numpy(np.ascontiguousarray(array))
            expected[name] = dequant
        else:
            sd[name] = value
    torch.save(sd, out / "pytorch_model.bin")
    return out, expected
