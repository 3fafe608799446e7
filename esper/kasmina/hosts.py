"""CNN host family: presets, per-env initialization, and the block-by-block forward."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esper import rng
from esper.kasmina import layers
from esper.leyline import CANONICAL_SLOTS


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A host architecture: conv-norm-ReLU blocks of width ``base * 2**i``.

    ``slot_after[k]`` is the block after which slot ``CANONICAL_SLOTS[k]`` sits.
    """

    name: str
    base_width: int
    num_blocks: int
    slot_after: tuple[int, ...]
    max_width: int = 256

    def __post_init__(self) -> None:
        if self.base_width < 1 or self.num_blocks < 1:
            raise ValueError(f"host {self.name!r}: base_width and num_blocks must be >= 1")
        if len(self.slot_after) != len(CANONICAL_SLOTS):
            raise ValueError(f"host {self.name!r}: needs one block index per slot {CANONICAL_SLOTS}")
        if any(not 0 <= b < self.num_blocks for b in self.slot_after):
            raise ValueError(f"host {self.name!r}: slot_after {self.slot_after} outside 0..{self.num_blocks - 1}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(min(self.base_width * 2**i, self.max_width) for i in range(self.num_blocks))

    def slot_channels(self, slot: str) -> int:
        return self.widths[self.slot_after[CANONICAL_SLOTS.index(slot)]]

    def spatial_after(self, image_size: int) -> tuple[int, ...]:
        """Spatial size after each block (a block pools 2x2 while the map is at least 4 wide)."""
        sizes, s = [], image_size
        for _ in range(self.num_blocks):
            if s >= 4:
                s //= 2
            sizes.append(s)
        return tuple(sizes)

    def slot_spatial(self, slot: str, image_size: int) -> int:
        return self.spatial_after(image_size)[self.slot_after[CANONICAL_SLOTS.index(slot)]]

    def param_count(self, in_channels: int, num_classes: int) -> int:
        total, cin = 0, in_channels
        for w in self.widths:
            total += w * cin * 9 + 2 * w
            cin = w
        return total + cin * num_classes + num_classes


HOST_PRESETS: dict[str, HostSpec] = {
    "minimal": HostSpec("minimal", base_width=2, num_blocks=3, slot_after=(0, 1, 2)),
    "impaired": HostSpec("impaired", base_width=4, num_blocks=3, slot_after=(0, 1, 2)),
    # One conv block with all three slots stacked after it: short of *depth*, which is what
    # residual seeds add (the narrow "impaired" host is short of first-layer width instead).
    "shallow": HostSpec("shallow", base_width=16, num_blocks=1, slot_after=(0, 0, 0)),
    "baseline": HostSpec("baseline", base_width=16, num_blocks=3, slot_after=(0, 1, 2)),
    "wide": HostSpec("wide", base_width=32, num_blocks=3, slot_after=(0, 1, 2)),
    "deep": HostSpec("deep", base_width=16, num_blocks=5, slot_after=(1, 2, 4)),
}


def host_spec(name: str) -> HostSpec:
    if name not in HOST_PRESETS:
        raise ValueError(f"unknown host preset {name!r}; allowed: {sorted(HOST_PRESETS)}")
    return HOST_PRESETS[name]


def init_host(
    spec: HostSpec, keys: torch.Tensor, in_channels: int, num_classes: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-env parameters ``[N, ...]`` (Kaiming-normal convs) and BatchNorm buffers.

    Env ``i``'s values depend only on ``keys[i]``, so batching never changes an env.
    """
    n = keys.shape[0]
    device = keys.device
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    cin = in_channels
    for i, w in enumerate(spec.widths):
        fan_in = cin * 9
        params[f"block{i}.conv"] = layers.init_weight(keys, (100, i), (w, cin, 3, 3), fan_in)
        params[f"block{i}.bn_w"] = torch.ones(n, w, device=device)
        params[f"block{i}.bn_b"] = torch.zeros(n, w, device=device)
        buffers[f"block{i}.bn_mean"] = torch.zeros(n, w, device=device)
        buffers[f"block{i}.bn_var"] = torch.ones(n, w, device=device)
        cin = w
    bound = 1.0 / math.sqrt(cin)
    u = rng.uniform(rng.stream_key(keys, 200), (num_classes, cin + 1))
    params["head.w"] = (u[..., :cin] * 2 - 1) * bound
    params["head.b"] = (u[..., cin] * 2 - 1) * bound
    return params, buffers


def host_block(
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    new_buffers: dict[str, torch.Tensor],
    i: int,
    x: torch.Tensor,
    training: bool,
    shared_input: bool = False,
) -> torch.Tensor:
    """Block ``i``: conv -> BatchNorm -> ReLU -> (2x2 max-pool while wide enough)."""
    h = layers.conv(x, params[f"block{i}.conv"], shared_input=shared_input)
    h, m, v = layers.batch_norm(
        h, params[f"block{i}.bn_w"], params[f"block{i}.bn_b"],
        buffers[f"block{i}.bn_mean"], buffers[f"block{i}.bn_var"], training,
    )
    new_buffers[f"block{i}.bn_mean"] = m
    new_buffers[f"block{i}.bn_var"] = v
    h = F.relu(h)
    if h.shape[-1] >= 4:
        h = F.max_pool2d(h, 2)
    return h


def host_head(params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Global average pool and the per-env linear classifier: logits ``[N, B, K]``."""
    return layers.linear_head(h.mean(dim=(2, 3)), params["head.w"], params["head.b"])
