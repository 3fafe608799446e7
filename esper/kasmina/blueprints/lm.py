"""Seed blueprints for transformer hosts: an MLP block, an attention head, a LoRA attention.

A slot sits between two transformer blocks, on the residual stream, so each seed is a
pre-LayerNorm residual sublayer ``delta(h)`` whose output projection starts at zero: a freshly
germinated seed computes ``s = h + 0 = h`` exactly. Seeds see the stream in the grouped layout
``[B, N*D, L, 1]`` (env count ``N`` symbolic when a compiled step runs them on a gathered group)
and work on env-major ``[N, B, L, D]`` views of it. Attention is causal, so no seed reads a
later token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esper.kasmina import layers
from esper.kasmina.blueprints.base import Blueprint, Params, register_blueprint
from esper.kasmina.transformer import causal_attention, env_major, layer_norm, linear, to_grouped

LORA_RANK = 4


def _mlp_hidden(d: int) -> int:
    return 4 * d


def _head_dim(d: int) -> int:
    return max(d // 2, 1)


def _ln_params(keys: torch.Tensor, d: int) -> Params:
    n, dev = keys.shape[0], keys.device
    return {"ln_w": torch.ones(n, d, device=dev), "ln_b": torch.zeros(n, d, device=dev)}


def _zeros(keys: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.zeros(keys.shape[0], *shape, device=keys.device)


def _normed(p: Params, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream env-major ``[N, B, L, D]`` and its LayerNorm."""
    t = env_major(x, n)
    return t, layer_norm(t, p["ln_w"], p["ln_b"])


# ----------------------------------------------------------------------------- mlp
def _mlp_init(keys: torch.Tensor, d: int) -> Params:
    m = _mlp_hidden(d)
    return {
        **_ln_params(keys, d),
        "fc": layers.init_weight(keys, (1,), (d, m), d),
        "fc_b": _zeros(keys, m),
        "out": _zeros(keys, m, d),
        "out_b": _zeros(keys, d),
    }


def _mlp_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    _, a = _normed(p, x, n)
    return to_grouped(linear(F.gelu(linear(a, p["fc"], p["fc_b"])), p["out"], p["out_b"]))


# mlp: LayerNorm -> D x 4D -> GELU -> 4D x D, the output layer starting at zero.
register_blueprint(
    Blueprint(
        name="mlp",
        init=_mlp_init,
        delta=_mlp_delta,
        param_count=lambda d: 2 * d + 2 * d * _mlp_hidden(d) + _mlp_hidden(d) + d,
        macs=lambda d, seq: (2 * d * _mlp_hidden(d) + 4 * d) * seq,
        family="lm",
    )
)


# ----------------------------------------------------------------------------- head
def _head_init(keys: torch.Tensor, d: int) -> Params:
    dh = _head_dim(d)
    return {
        **_ln_params(keys, d),
        "qkv": layers.init_weight(keys, (1,), (d, 3 * dh), d),
        "out": _zeros(keys, dh, d),
    }


def _head_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    _, a = _normed(p, x, n)
    q, k, v = linear(a, p["qkv"]).chunk(3, dim=-1)
    return to_grouped(linear(causal_attention(q, k, v, heads=1), p["out"]))


# head: one more causal attention head (width D/2), its output projection starting at zero.
register_blueprint(
    Blueprint(
        name="head",
        init=_head_init,
        delta=_head_delta,
        param_count=lambda d: 2 * d + 4 * d * _head_dim(d),
        macs=lambda d, seq: (4 * d * _head_dim(d) + 2 * d) * seq + _head_dim(d) * seq * (seq + 1),
        family="lm",
    )
)


# ----------------------------------------------------------------------------- block
BLOCK_HEADS = 2


def _block_init(keys: torch.Tensor, d: int) -> Params:
    n, dev = keys.shape[0], keys.device
    m = _mlp_hidden(d)
    return {
        **_ln_params(keys, d),
        "qkv": layers.init_weight(keys, (1,), (d, 3 * d), d),
        "proj": _zeros(keys, d, d),
        "ln2_w": torch.ones(n, d, device=dev),
        "ln2_b": _zeros(keys, d),
        "fc": layers.init_weight(keys, (2,), (d, m), d),
        "fc_b": _zeros(keys, m),
        "out": _zeros(keys, m, d),
        "out_b": _zeros(keys, d),
    }


def _block_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    t, a = _normed(p, x, n)
    q, k, v = linear(a, p["qkv"]).chunk(3, dim=-1)
    u = t + linear(causal_attention(q, k, v, heads=BLOCK_HEADS if t.shape[-1] % BLOCK_HEADS == 0 else 1), p["proj"])
    m = F.gelu(linear(layer_norm(u, p["ln2_w"], p["ln2_b"]), p["fc"], p["fc_b"]))
    return to_grouped(u + linear(m, p["out"], p["out_b"]) - t)


# block: a whole pre-LayerNorm transformer block (2-head causal attention, then a D x 4D MLP),
# both output projections starting at zero: depth, which is what a one-block host lacks most
# (bench/lm_capacity_ref.py: four blocks at the small width close most of the gap to a host
# 12x larger, README).
register_blueprint(
    Blueprint(
        name="block",
        init=_block_init,
        delta=_block_delta,
        param_count=lambda d: 4 * d + 4 * d * d + 2 * d * _mlp_hidden(d) + _mlp_hidden(d) + d,
        macs=lambda d, seq: (4 * d * d + 2 * d * _mlp_hidden(d) + 6 * d) * seq + d * seq * (seq + 1),
        family="lm",
    )
)


# ----------------------------------------------------------------------------- lora
def _lora_init(keys: torch.Tensor, d: int) -> Params:
    r = LORA_RANK
    p = _ln_params(keys, d)
    for j, name in enumerate(("q", "k", "v", "o")):
        p[f"{name}_a"] = layers.init_weight(keys, (1, j), (d, r), d)
        p[f"{name}_b"] = (_zeros(keys, r, d) if name == "o" else layers.init_weight(keys, (2, j), (r, d), r))
    return p


def _low_rank(t: torch.Tensor, p: Params, name: str) -> torch.Tensor:
    return linear(linear(t, p[f"{name}_a"]), p[f"{name}_b"])


def _lora_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    _, a = _normed(p, x, n)
    q, k, v = (_low_rank(a, p, name) for name in ("q", "k", "v"))
    return to_grouped(_low_rank(causal_attention(q, k, v, heads=1), p, "o"))


# lora: a causal attention whose q/k/v/o projections are each a rank-4 LoRA pair (A random,
# B; the output's B starts at zero). A slot sits between blocks, so it cannot reach inside the
# host's own projections without routing gradient through host weights; this is the low-rank
# attention update that LoRA would learn, added on the residual stream (note in README).
register_blueprint(
    Blueprint(
        name="lora",
        init=_lora_init,
        delta=_lora_delta,
        param_count=lambda d: 2 * d + 8 * d * LORA_RANK,
        macs=lambda d, seq: (8 * d * LORA_RANK + 2 * d) * seq + d * seq * (seq + 1),
        family="lm",
    )
)
