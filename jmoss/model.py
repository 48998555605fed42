"""MOSS / CodeGen forward pass in Jittor: a transcription of moss-spec §1, nothing else.

Per block (one LayerNorm, attention and MLP in parallel on its output):

    a      = LN_1(h)
    h_next = out_proj(Attn(a)) + fc_out(gelu_new(fc_in(a))) + h

Attention: q, k, v from the fused ``attn.qkv.weight`` (already re-laid out by the converter into
[q heads | k heads | v heads], see jmoss/layout.py), GPT-J "rotate every two" rotary on the
first ``rotary_dim`` dims of q and k at absolute positions, scores and softmax in float32 with
the 1/sqrt(head_dim) scale, probabilities cast to the value dtype, then merged heads.

Blocks compute with whatever weights they are handed for that call (a dict of jittor Vars in
store names), so the streaming engine decides where each layer's weights come from. Linear layers,
LayerNorm and attention go through a ``ModelOps`` object: ``JittorOps`` below is the plain-jittor
transcription of the math (and the reference), ``jmoss.kernels`` the fused CPU path that replaces
it for fp16 weights with fp32 activations, without the model knowing. The token embedding is gathered on the host (numpy): decode needs one row per token, so
the 107008-row table never has to live on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Mapping, Protocol

import numpy as np

from jmoss.config import MossConfig
from jmoss.kernels import cuda_quant

# Masked attention scores are replaced by this (the reference uses float32's minimum; any value
# whose exp underflows to 0 after max-subtraction gives the same probabilities).
MASK_VALUE = float(np.finfo(np.float32).min)


class ModelOps(Protocol):
    """The compute a block delegates: plain jittor here (the reference), or jmoss.kernels on CPU.

    linear:     y = x @ weight.T + bias, optionally followed by gelu_new; x is 2-D [tokens, in]
    layer_norm: LayerNorm over the last dim, computed and returned in float32
    attention:  rotary on q and k, this step's k/v written into the layer's static cache at
                [start, start+T), softmax attention over [0, start+T); returns [B, T, H*Dh]
    """

    def linear(self, x, weight, bias=None, activation: str | None = None): ...

    def quant_linear(self, x, perm, qweight, scales, zeros, bias=None, *, bits: int, group_size: int,
                     activation: str | None = None): ...

    def layer_norm(self, x, weight, bias, eps: float): ...

    def attention(self, qkv, keys, values, sin, cos, attn_bias, start: int, rotary_dim: int): ...


class JittorOps:
    """Plain jittor ops: any dtype, any device; the reference the kernels are tested against."""

    def __init__(self, jt: ModuleType):
        self.jt = jt

    def linear(self, x, weight, bias=None, activation: str | None = None):
        y = self.jt.nn.matmul_transpose(x, weight)
        if bias is not None:
            y = y + bias
        if activation == "gelu_new":
            y = gelu_new(self.jt, y)
        return y

    def quant_linear(self, x, perm, qweight, scales, zeros, bias=None, *, bits: int, group_size: int,
                     activation: str | None = None):
        """A packed (store format 2) Linear in plain jittor: the fallback where jmoss.kernels is not
        used (it dequantizes the layer for the call, which the CPU kernels never do)."""
        jt = self.jt
        n_out, k_in = int(qweight.shape[0]), int(perm.shape[0])
        if jt.flags.use_cuda and cuda_quant.supports(bits, group_size, int(qweight.shape[1])):
            y = cuda_quant.quant_linear(jt, x, perm, qweight, scales, zeros, bits=bits, group_size=group_size, cuda=True)
            return self.linear_tail(y, bias, activation)
        xp = x.float32()[:, perm]
        if n_out * k_in > DEQUANT_WHOLE_MAX:  # a packed lm_head (657M weights for MOSS): one tile at a time
            rows = max(1, DEQUANT_TILE // k_in)
            parts = []
            for start in range(0, n_out, rows):
                stop = min(n_out, start + rows)
                w = dequantize_rows(jt, qweight[start:stop], scales[start:stop], zeros[start:stop], k_in, bits,
                                    group_size)
                y = self.jt.nn.matmul_transpose(xp, w)
                y.sync()  # this tile's weights are freed before the next one is made
                parts.append(y)
            y = jt.concat(parts, dim=1)
            return self.linear_tail(y, bias, activation)
        w = dequantize_rows(jt, qweight, scales, zeros, k_in, bits, group_size)
        return self.linear(xp, w, None if bias is None else bias.float32(), activation)

    def linear_tail(self, y, bias=None, activation: str | None = None):
        if bias is not None:
            y = y + bias.float32()
        if activation == "gelu_new":
            y = gelu_new(self.jt, y)
        return y

    def layer_norm(self, x, weight, bias, eps: float):
        """Float32 statistics whatever the activation dtype (fp16 variance would lose digits)."""
        jt = self.jt
        x32 = x.float32()
        mean = x32.mean(dim=-1, keepdims=True)
        centred = x32 - mean
        var = (centred * centred).mean(dim=-1, keepdims=True)
        return centred / jt.sqrt(var + eps) * weight.float32() + bias.float32()

    def attention(self, qkv, keys, values, sin, cos, attn_bias, start: int, rotary_dim: int):
        """Scores and softmax in float32 with the 1/sqrt(head_dim) scale; probabilities cast to
        the cache dtype before they weight the values (as the reference does)."""
        jt = self.jt
        b, t, width = qkv.shape
        heads, dim = keys.shape[1], keys.shape[3]
        d = width // 3
        q = qkv[:, :, :d].reshape(b, t, heads, dim).float32()
        k = qkv[:, :, d : 2 * d].reshape(b, t, heads, dim).float32()
        v = qkv[:, :, 2 * d :].reshape(b, t, heads, dim)
        q = apply_rotary(jt, q, sin, cos, rotary_dim)
        k = apply_rotary(jt, k, sin, cos, rotary_dim)

        end = start + t
        keys[:, :, start:end, :] = k.transpose(0, 2, 1, 3).cast(keys.dtype)
        values[:, :, start:end, :] = v.transpose(0, 2, 1, 3).cast(values.dtype)

        q = q.transpose(0, 2, 1, 3)  # [B, H, T, D]
        scores = jt.matmul(q, keys[:, :, :end, :].float32().transpose(0, 1, 3, 2)) / math.sqrt(dim)
        probs = jt.nn.softmax(scores + attn_bias, dim=-1)
        context = jt.matmul(probs.cast(values.dtype), values[:, :, :end, :])  # [B, H, T, D]
        return context.transpose(0, 2, 1, 3).reshape(b, t, d)


# JittorOps.quant_linear dequantizes a packed weight whole up to this many values (every MOSS layer
# Linear: fc_in is 151M), beyond it (a packed lm_head) in tiles of DEQUANT_TILE values (fp32).
DEQUANT_WHOLE_MAX = 1 << 28
DEQUANT_TILE = 1 << 26


def dequant_transient_bytes(linears: list[tuple[int, int]], *, cuda: bool = False) -> int:
    """Largest fp32 weight JittorOps.quant_linear makes at once for these [N, K] packed Linears
    (on CUDA: the dequantizing kernels' prefill tile; decode makes none)."""
    if cuda:
        return max((cuda_quant.transient_bytes(k, n) for n, k in linears), default=0)
    return 4 * max((n * k if n * k <= DEQUANT_WHOLE_MAX else max(1, DEQUANT_TILE // k) * k for n, k in linears), default=0)


def dequantize_rows(jt: ModuleType, qweight, scales, zeros, k_in: int, bits: int, group_size: int):
    """float32 W [rows, K] in the permuted input order of packed rows (the plain-jittor fallback)."""
    wide = qweight.int32()
    if bits == 8:
        codes = wide[:, :k_in]
    else:
        codes = jt.stack([wide & 15, (wide >> 4) & 15], -1).reshape(int(qweight.shape[0]), -1)[:, :k_in]
    g = np.arange(k_in) // group_size
    return (codes.float32() - zeros.float32()[:, g]) * scales.float32()[:, g]


def gelu_new(jt: ModuleType, x):
    """GPT-2's tanh approximation of GELU (the activation MOSS/CodeGen were trained with)."""
    return 0.5 * x * (1.0 + jt.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def rotary_tables(config: MossConfig) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos for every position, [n_positions, rotary_dim/2] float32 (inv_freq in fp32)."""
    half = config.rotary_dim // 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, config.rotary_dim, 2, dtype=np.float32) / config.rotary_dim))
    angles = np.arange(config.n_positions, dtype=np.float32)[:, None] * inv_freq[None, :half]
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rotary(jt: ModuleType, x, sin, cos, rotary_dim: int):
    """Rotate adjacent pairs (2i, 2i+1) of the first rotary_dim dims; x is [B, T, H, D] float32.

    sin/cos are [B, T, 1, rotary_dim/2]: out[2i] = x[2i]cos - x[2i+1]sin, out[2i+1] = x[2i+1]cos + x[2i]sin.
    """
    b, t, h, d = x.shape
    rot = x[:, :, :, :rotary_dim].reshape(b, t, h, rotary_dim // 2, 2)
    even, odd = rot[:, :, :, :, 0], rot[:, :, :, :, 1]
    out = jt.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).reshape(b, t, h, rotary_dim)
    if rotary_dim == d:
        return out
    return jt.concat([out, x[:, :, :, rotary_dim:]], dim=-1)


class KVCache:
    """Static per-layer key/value buffers [batch, heads, max_len, head_dim], written by position.

    Allocated once per (batch, max_len); a forward step writes its new keys/values into slots
    [start, start + T) and attends over [0, start + T). Keys are stored after rotary.
    """

    def __init__(self, jt: ModuleType, config: MossConfig, batch: int, max_len: int, dtype: str):
        shape = (batch, config.n_head, max_len, config.head_dim)
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.keys = [jt.zeros(shape, dtype) for _ in range(config.n_layer)]
        self.values = [jt.zeros(shape, dtype) for _ in range(config.n_layer)]
        for var in self.keys + self.values:
            var.sync()

    @classmethod
    def of_layers(cls, keys: list, values: list, batch: int, max_len: int, dtype: str) -> "KVCache":
        """A cache whose per-layer buffers were allocated elsewhere (the segmented engine puts each
        layer's where that layer's attention runs); ``dtype`` is the device side's."""
        self = cls.__new__(cls)
        self.batch, self.max_len, self.dtype, self.keys, self.values = batch, max_len, dtype, list(keys), list(values)
        return self

    @property
    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.keys + self.values)


@dataclass
class Step:
    """What one forward call needs besides weights: where its tokens go and what they may see.

    ``positions`` [B, T] are the rotary position ids (left-padding aware); ``key_mask`` [B, start+T]
    is 1 for real tokens in the cache. sin/cos/bias are built once per step, shared by all layers.
    """

    start: int
    length: int
    sin: object  # jt.Var [B, T, 1, R/2]
    cos: object
    attn_bias: object  # jt.Var [B, 1, T, start+T] float32, 0 where allowed, MASK_VALUE elsewhere


def make_step(
    jt: ModuleType,
    config: MossConfig,
    tables: tuple[np.ndarray, np.ndarray],
    start: int,
    positions: np.ndarray,
    key_mask: np.ndarray,
) -> Step:
    """Build the per-step rotary factors and the causal+padding mask on the host."""
    batch, length = positions.shape
    total = start + length
    sin, cos = tables
    allowed = np.tril(np.ones((length, total), dtype=bool), k=start)[None, :, :] & (key_mask[:, None, :total] > 0)
    bias = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None, :, :]
    return Step(
        start=start,
        length=length,
        sin=jt.array(sin[positions][:, :, None, :]),
        cos=jt.array(cos[positions][:, :, None, :]),
        attn_bias=jt.array(bias),
    )


class MossModel:
    """The transformer math; owns no weights (they are passed to each call)."""

    def __init__(self, jt: ModuleType, config: MossConfig, ops: ModelOps, compute_dtype: str):
        self.jt, self.config, self.ops, self.dtype = jt, config, ops, compute_dtype

    def new_cache(self, batch: int, max_len: int, dtype: str) -> KVCache:
        """The static KV cache this model's forward writes (one place makes it, so an engine that
        runs the model as segments can put each layer's where it attends)."""
        return KVCache(self.jt, self.config, batch, max_len, dtype)

    def _linear(self, x, w: Mapping, name: str, activation: str | None = None):
        b, t, k = x.shape
        if f"{name}.qweight" in w:  # a packed layer (store format 2): bits and group size are the store's
            y = self.ops.quant_linear(x.reshape(b * t, k), w[f"{name}.perm"], w[f"{name}.qweight"], w[f"{name}.scales"],
                                      w[f"{name}.zeros"], w.get(f"{name}.bias"), bits=self.config.wbits,
                                      group_size=self.config.groupsize, activation=activation)
        else:
            y = self.ops.linear(x.reshape(b * t, k), w[f"{name}.weight"], w.get(f"{name}.bias"), activation=activation)
        return y.cast(self.dtype).reshape(b, t, -1)

    def block(self, h, w: Mapping, layer: int, cache: KVCache, step: Step):
        """One MossBlock: h + Attn(LN(h)) + MLP(LN(h)); writes this step's keys/values to the cache.

        Ops that can run a whole layer as one op for a decode step (jmoss.kernels' decode_block)
        do so; it computes the same thing (tests/test_decode_block.py), with one op instead of ~12."""
        fused = getattr(self.ops, "decode_block", None)
        if fused is not None:
            packed = "attn.qkv.qweight" in w
            y = fused(h, w, cache.keys[layer], cache.values[layer], step.sin, step.cos, step.attn_bias, step.start,
                      eps=self.config.layer_norm_epsilon, rotary_dim=self.config.rotary_dim,
                      bits=self.config.wbits if packed else 0, group_size=self.config.groupsize if packed else 0)
            if y is not None:
                return y
        a = self._layer_norm(h, w, "ln_1")
        return self.attention(a, w, layer, cache, step) + self.mlp(a, w) + h

    def _layer_norm(self, x, w: Mapping, name: str):
        return self.ops.layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], self.config.layer_norm_epsilon).cast(self.dtype)

    def attention(self, a, w: Mapping, layer: int, cache: KVCache, step: Step):
        qkv = self._linear(a, w, "attn.qkv")
        merged = self.ops.attention(qkv, cache.keys[layer], cache.values[layer], step.sin, step.cos, step.attn_bias,
                                    step.start, self.config.rotary_dim)
        return self._linear(merged.cast(self.dtype), w, "attn.out_proj")

    def mlp(self, a, w: Mapping):
        return self._linear(self._linear(a, w, "mlp.fc_in", activation="gelu_new"), w, "mlp.fc_out")

    def head(self, h, w: Mapping):
        """Final LayerNorm and lm_head (with bias; packed in a packed store by default); logits in float32."""
        h = self._layer_norm(h, w, "ln_f")
        b, t, d = h.shape
        if "lm_head.qweight" in w:
            from jmoss.layout import head_bits

            y = self.ops.quant_linear(h.reshape(b * t, d), w["lm_head.perm"], w["lm_head.qweight"], w["lm_head.scales"],
                                      w["lm_head.zeros"], w["lm_head.bias"], bits=head_bits(self.config),
                                      group_size=self.config.groupsize)
            return y.float32().reshape(b, t, -1)
        return self.ops.linear(h.reshape(b * t, d), w["lm_head.weight"], w["lm_head.bias"]).float32().reshape(b, t, -1)

    def forward(
        self,
        embeddings: np.ndarray,
        layer_weights: Callable[[int], Mapping],
        head_weights: Callable[[], Mapping],
        cache: KVCache,
        step: Step,
        last_only: bool = False,
        logits: bool = True,
        tail: int | None = None,
    ):
        """Run all blocks over host-gathered embeddings [B, T, d]; return float32 logits.

        ``layer_weights(i)`` is called once per layer in order, so a streaming source can prefetch.
        With ``last_only`` only the last position's logits are computed (decode and prefill need no more);
        ``tail`` keeps the last ``tail`` positions instead (a batch step in which rows verify drafts).
        ``logits=False`` (a prompt chunk before the last) skips the head and returns the last hidden
        state instead, to be synced so the chunk's keys and values are written; the head's weights
        are still taken, so a streaming source sees the order it prefetches in.
        """
        h = self.jt.array(embeddings).cast(self.dtype)
        for i in range(self.config.n_layer):
            h = self.block(h, layer_weights(i), i, cache, step)
        if tail:
            h = h[:, -tail:, :]
        elif last_only:
            h = h[:, -1:, :]
        head = head_weights()
        return self.head(h, head) if logits else h
