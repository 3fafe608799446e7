"""Seed blueprints for CNN hosts, on the grouped layout.

Every blueprint is a residual ``delta`` with a zero-initialized output path, so a freshly
germinated seed computes ``s = h + delta(h) = h`` and cannot change the host's function at the
moment it appears. Adding a blueprint is one ``register_blueprint`` call in its family's module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esper.kasmina import groupops, layers
from esper.kasmina.blueprints.base import Blueprint, Params, register_blueprint


def _weight(keys: torch.Tensor, stream: int, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    return layers.init_weight(keys, (stream,), shape, fan_in)


def _groups(c: int) -> int:
    """GroupNorm groups per env: up to 4, dividing the channel count."""
    for g in (4, 2, 1):
        if c % g == 0:
            return g
    return 1


def _depthwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, c = weight.shape[:2]
    return groupops.conv2d(x, weight.reshape(n * c, 1, 3, 3), padding=1)


def _norm(x: torch.Tensor, n: int, c: int, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return layers.group_norm(x, n, _groups(c), w, b)


def _ones(keys: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.ones(keys.shape[0], *shape, device=keys.device)


def _zeros(keys: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.zeros(keys.shape[0], *shape, device=keys.device)


# noop: a slot that holds a seed but adds nothing (the "do nothing" arm of the search).
register_blueprint(
    Blueprint(
        name="noop",
        init=lambda keys, c: {},
        delta=lambda p, x, n: torch.zeros_like(x),
        param_count=lambda c: 0,
        macs=lambda c, hw: 0,
        identity=True,
        family="any",
    )
)


def _norm_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    c = x.shape[1] // n
    mixed = _norm(x, n, c, p["w"], p["b"]) - x
    return mixed * layers.per_env(p["gate"].flatten(), 4, 1).repeat_interleave(c, dim=1)


# norm: GroupNorm mixed in through a per-env gate that starts closed.
register_blueprint(
    Blueprint(
        name="norm",
        init=lambda keys, c: {"w": _ones(keys, c), "b": _zeros(keys, c), "gate": _zeros(keys, 1)},
        delta=_norm_delta,
        param_count=lambda c: 2 * c + 1,
        macs=lambda c, hw: 4 * c * hw,
    )
)


def _se_hidden(c: int) -> int:
    return max(c // 4, 2)


def _attention_init(keys: torch.Tensor, c: int) -> Params:
    r = _se_hidden(c)
    return {
        "w1": _weight(keys, 1, (r, c), c),
        "b1": _zeros(keys, r),
        "w2": _zeros(keys, c, r),
        "b2": _zeros(keys, c),
    }


def _attention_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    b, nc = x.shape[:2]
    c = nc // n
    pooled = x.mean(dim=(2, 3)).view(b, n, c)
    z = F.relu(torch.einsum("bnc,nrc->bnr", pooled, p["w1"]) + p["b1"])
    s = torch.tanh(torch.einsum("bnr,ncr->bnc", z, p["w2"]) + p["b2"])
    return x * s.reshape(b, nc, 1, 1)


# attention: squeeze-and-excitation, a per-channel rescaling that starts at zero change.
register_blueprint(
    Blueprint(
        name="attention",
        init=_attention_init,
        delta=_attention_delta,
        param_count=lambda c: 2 * c * _se_hidden(c) + _se_hidden(c) + c,
        macs=lambda c, hw: 2 * c * _se_hidden(c) + 2 * c * hw,
    )
)


def _depthwise_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    c = x.shape[1] // n
    h = layers.seed_conv(_depthwise(x, p["dw"]), p["pw"], padding=0)
    return _norm(h, n, c, p["gn_w"], p["gn_b"])


# depthwise: 3x3 depthwise + 1x1 pointwise + norm, residual (norm scale starts at zero).
register_blueprint(
    Blueprint(
        name="depthwise",
        init=lambda keys, c: {
            "dw": _weight(keys, 1, (c, 1, 3, 3), 9),
            "pw": _weight(keys, 2, (c, c, 1, 1), c),
            "gn_w": _zeros(keys, c),
            "gn_b": _zeros(keys, c),
        },
        delta=_depthwise_delta,
        param_count=lambda c: 9 * c + c * c + 2 * c,
        macs=lambda c, hw: (9 * c + c * c + 4 * c) * hw,
    )
)


def _bottleneck_width(c: int) -> int:
    return max(c // 4, 2)


def _bottleneck_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    h = F.relu(layers.seed_conv(x, p["reduce"], padding=0))
    h = F.relu(layers.seed_conv(h, p["mix"], padding=1))
    return layers.seed_conv(h, p["expand"], padding=0)


def _bottleneck_init(keys: torch.Tensor, c: int) -> Params:
    r = _bottleneck_width(c)
    return {
        "reduce": _weight(keys, 1, (r, c, 1, 1), c),
        "mix": _weight(keys, 2, (r, r, 3, 3), 9 * r),
        "expand": _zeros(keys, c, r, 1, 1),
    }


# bottleneck: 1x1 reduce -> 3x3 -> 1x1 expand, the expand starting at zero.
register_blueprint(
    Blueprint(
        name="bottleneck",
        init=_bottleneck_init,
        delta=_bottleneck_delta,
        param_count=lambda c: 2 * c * _bottleneck_width(c) + 9 * _bottleneck_width(c) ** 2,
        macs=lambda c, hw: (2 * c * _bottleneck_width(c) + 9 * _bottleneck_width(c) ** 2) * hw,
    )
)


def _conv_small_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    c = x.shape[1] // n
    return _norm(layers.seed_conv(x, p["pw"], padding=0), n, c, p["gn_w"], p["gn_b"])


# conv_small: 1x1 conv + norm, norm scale starting at zero.
register_blueprint(
    Blueprint(
        name="conv_small",
        init=lambda keys, c: {
            "pw": _weight(keys, 1, (c, c, 1, 1), c),
            "gn_w": _zeros(keys, c),
            "gn_b": _zeros(keys, c),
        },
        delta=_conv_small_delta,
        param_count=lambda c: c * c + 2 * c,
        macs=lambda c, hw: (c * c + 4 * c) * hw,
    )
)


def _conv_block(x: torch.Tensor, n: int, w: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    c = x.shape[1] // n
    return F.relu(_norm(layers.seed_conv(x, w, padding=1), n, c, gw, gb))


def _conv_light_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    h = _conv_block(x, n, p["conv"], p["gn_w"], p["gn_b"])
    return h * p["scale"].reshape(1, -1, 1, 1)


# conv_light: one 3x3 conv-norm-ReLU, residual through a per-channel scale starting at zero.
register_blueprint(
    Blueprint(
        name="conv_light",
        init=lambda keys, c: {
            "conv": _weight(keys, 1, (c, c, 3, 3), 9 * c),
            "gn_w": _ones(keys, c),
            "gn_b": _zeros(keys, c),
            "scale": _zeros(keys, c),
        },
        delta=_conv_light_delta,
        param_count=lambda c: 9 * c * c + 3 * c,
        macs=lambda c, hw: (9 * c * c + 5 * c) * hw,
    )
)


def _conv_heavy_delta(p: Params, x: torch.Tensor, n: int) -> torch.Tensor:
    h = _conv_block(x, n, p["conv1"], p["gn1_w"], p["gn1_b"])
    h = _conv_block(h, n, p["conv2"], p["gn2_w"], p["gn2_b"])
    return h * p["scale"].reshape(1, -1, 1, 1)


# conv_heavy: two 3x3 conv-norm-ReLU layers, residual through a zero-initialized scale.
register_blueprint(
    Blueprint(
        name="conv_heavy",
        init=lambda keys, c: {
            "conv1": _weight(keys, 1, (c, c, 3, 3), 9 * c),
            "gn1_w": _ones(keys, c),
            "gn1_b": _zeros(keys, c),
            "conv2": _weight(keys, 2, (c, c, 3, 3), 9 * c),
            "gn2_w": _ones(keys, c),
            "gn2_b": _zeros(keys, c),
            "scale": _zeros(keys, c),
        },
        delta=_conv_heavy_delta,
        param_count=lambda c: 18 * c * c + 5 * c,
        macs=lambda c, hw: (18 * c * c + 10 * c) * hw,
    )
)
