"""Transformer host family: N causal language models as one tensor program.

Every weight carries a leading env dimension ``[N, ...]`` and every matmul is batched over it
(``einsum``), so N envs run as one program exactly as the CNN hosts do. Between blocks the
activations take the CNN's grouped layout, ``[B, N*D, L, 1]`` (memory ``[B, L, N, D]``): the
slots, the alpha blend kernels, gradient isolation and the counterfactual rows then work on a
language model unchanged, with the sequence standing in for the image's height. Inside a
block the activations are env-major ``[N, B, L, D]`` views of the same memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esper import rng
from esper.kasmina import layers
from esper.leyline import CANONICAL_SLOTS

Tensors = dict[str, torch.Tensor]


def to_grouped(t: torch.Tensor) -> torch.Tensor:
    """Env-major ``[N, B, L, D]`` -> the grouped layout ``[B, N*D, L, 1]`` (one copy)."""
    n, b, seq, d = t.shape
    return t.permute(1, 2, 0, 3).reshape(b, seq, 1, n * d).permute(0, 3, 1, 2)


def env_major(h: torch.Tensor, n: int) -> torch.Tensor:
    """Grouped ``[B, N*D, L, 1]`` -> env-major ``[N, B, L, D]`` (a view when ``h`` is in the
    layout :func:`to_grouped` makes, a copy otherwise)."""
    b, nd, seq, _ = h.shape
    return h.permute(0, 2, 3, 1).reshape(b, seq, n, nd // n).permute(2, 0, 1, 3)


def layer_norm(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``[N, ..., D]`` with per-env affine ``[N, D]``.

    Written out (two passes, no ``F.layer_norm``) so the env count may stay symbolic when a
    seed runs on a gathered group under compile.
    """
    mean = t.mean(dim=-1, keepdim=True)
    var = (t - mean).square().mean(dim=-1, keepdim=True)
    shape = (weight.shape[0],) + (1,) * (t.dim() - 2) + (weight.shape[-1],)
    return (t - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


def linear(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-env linear map: ``[N, B, L, Din]`` times ``[N, Din, Dout]`` (+ ``[N, Dout]``)."""
    out = torch.einsum("nbli,nio->nblo", t, weight)
    if bias is not None:
        out = out + bias.view(bias.shape[0], 1, 1, bias.shape[-1])
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head causal self-attention of env-major ``[N, B, L, H*dh]`` projections."""
    n, b, seq, width = q.shape
    dh = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:  # -> [N*B, H, L, dh]
        return t.reshape(n * b, seq, heads, dh).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return out.transpose(1, 2).reshape(n, b, seq, width)


@dataclass(frozen=True, slots=True)
class TransformerSpec:
    """A pre-LayerNorm causal transformer: ``num_blocks`` blocks of width ``d_model``.

    ``slot_after[k]`` is the block after which slot ``CANONICAL_SLOTS[k]`` sits. The host's
    vocabulary is the task's class count and its positions the task's sequence length.
    """

    name: str
    d_model: int
    num_blocks: int
    heads: int
    mlp_hidden: int
    slot_after: tuple[int, ...]
    family: str = "lm"

    def __post_init__(self) -> None:
        if min(self.d_model, self.num_blocks, self.heads, self.mlp_hidden) < 1:
            raise ValueError(f"host {self.name!r}: d_model, num_blocks, heads and mlp_hidden must be >= 1")
        if self.d_model % self.heads:
            raise ValueError(f"host {self.name!r}: d_model {self.d_model} is not a multiple of heads {self.heads}")
        if len(self.slot_after) != len(CANONICAL_SLOTS):
            raise ValueError(f"host {self.name!r}: needs one block index per slot {CANONICAL_SLOTS}")
        if any(not 0 <= b < self.num_blocks for b in self.slot_after):
            raise ValueError(f"host {self.name!r}: slot_after {self.slot_after} outside 0..{self.num_blocks - 1}")

    def slot_channels(self, slot: str) -> int:
        return self.d_model

    def slot_positions(self, slot: str, sample_shape: tuple[int, ...]) -> int:
        """Positions a seed in ``slot`` computes on per sample: the sequence length."""
        return int(sample_shape[0])

    def param_count(self, sample_shape: tuple[int, ...], num_classes: int) -> int:
        d, m, seq, v = self.d_model, self.mlp_hidden, int(sample_shape[0]), num_classes
        block = 2 * 2 * d + 4 * d * d + 2 * d * m + m + d
        return v * d + seq * d + self.num_blocks * block + 2 * d + d * v + v

    # ------------------------------------------------------------------------- weights
    def init(self, keys: torch.Tensor, sample_shape: tuple[int, ...], num_classes: int) -> tuple[Tensors, Tensors]:
        """Per-env parameters ``[N, ...]`` (no buffers: LayerNorm keeps no running state).

        Env ``i``'s values depend only on ``keys[i]``. Embeddings draw std 0.02 (GPT-2's);
        projections PyTorch's linear scale ``1/sqrt(3 fan_in)``, the residual outputs scaled
        down by ``sqrt(2 * num_blocks)`` so depth does not grow the residual stream.
        """
        n, dev = keys.shape[0], keys.device
        d, m, seq, v = self.d_model, self.mlp_hidden, int(sample_shape[0]), num_classes
        ones, zeros = (lambda *s: torch.ones(n, *s, device=dev)), (lambda *s: torch.zeros(n, *s, device=dev))
        out_scale = 1.0 / math.sqrt(2 * self.num_blocks)
        p: Tensors = {
            "tok_emb": rng.normal(rng.stream_key(keys, 300), (v, d)) * 0.02,
            "pos_emb": rng.normal(rng.stream_key(keys, 301), (seq, d)) * 0.02,
        }
        for i in range(self.num_blocks):
            pre = f"block{i}."
            p[pre + "ln1_w"], p[pre + "ln1_b"] = ones(d), zeros(d)
            p[pre + "qkv"] = layers.init_weight(keys, (310, i), (d, 3 * d), d)
            p[pre + "proj"] = layers.init_weight(keys, (311, i), (d, d), d) * out_scale
            p[pre + "ln2_w"], p[pre + "ln2_b"] = ones(d), zeros(d)
            p[pre + "fc"] = layers.init_weight(keys, (312, i), (d, m), d)
            p[pre + "fc_b"] = zeros(m)
            p[pre + "out"] = layers.init_weight(keys, (313, i), (m, d), m) * out_scale
            p[pre + "out_b"] = zeros(d)
        p["ln_f_w"], p["ln_f_b"] = ones(d), zeros(d)
        p["head.w"] = layers.init_weight(keys, (320,), (d, v), d)
        p["head.b"] = zeros(v)
        return p, {}

    # ------------------------------------------------------------------------- forward
    def stem(self, params: Tensors, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """Token and position embeddings of ``x`` (``[N, B, L]`` per env, or one shared
        ``[B, L]`` batch for validation) in the grouped layout ``[B, N*D, L, 1]``."""
        tok, pos = params["tok_emb"], params["pos_emb"]
        n, v, d = tok.shape
        if shared:
            b, seq = x.shape
            t = tok.index_select(1, x.reshape(-1)).view(n, b, seq, d)
        else:
            _, b, seq = x.shape
            offset = (torch.arange(n, device=x.device) * v).view(n, 1, 1)
            t = tok.reshape(n * v, d).index_select(0, (x + offset).reshape(-1)).view(n, b, seq, d)
        return to_grouped(t + pos[:, None, :seq])

    def block(self, params: Tensors, buffers: Tensors, new_buffers: Tensors, i: int, h: torch.Tensor,
              training: bool, shared_input: bool = False) -> torch.Tensor:
        """Block ``i``: ``t + attn(ln1(t))`` then ``+ mlp(ln2(t))``, on the grouped layout."""
        pre = f"block{i}."
        n = params[pre + "qkv"].shape[0]
        t = env_major(h, n)
        a = layer_norm(t, params[pre + "ln1_w"], params[pre + "ln1_b"])
        q, k, v = linear(a, params[pre + "qkv"]).chunk(3, dim=-1)
        t = t + linear(causal_attention(q, k, v, self.heads), params[pre + "proj"])
        m = layer_norm(t, params[pre + "ln2_w"], params[pre + "ln2_b"])
        m = F.gelu(linear(m, params[pre + "fc"], params[pre + "fc_b"]))
        t = t + linear(m, params[pre + "out"], params[pre + "out_b"])
        return to_grouped(t)

    def head(self, params: Tensors, h: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and the per-env unembedding: logits ``[N, B, L, V]``."""
        n = params["ln_f_w"].shape[0]
        t = layer_norm(env_major(h, n), params["ln_f_w"], params["ln_f_b"])
        return linear(t, params["head.w"], params["head.b"])
