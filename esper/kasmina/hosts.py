"""Host families and their presets: CNN hosts (here) and transformer hosts (``transformer``).

A host spec is everything the batched model asks of a host: its slots, widths, parameters and
the block-by-block forward (``init``, ``stem``, ``block``, ``head``), so the slots, blending
and lifecycle run on either family unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esper import rng
from esper.kasmina import layers
from esper.kasmina.transformer import TransformerSpec
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
    family: str = "cnn"

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

    def spatial_after(self, image_size: int | tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """(H, W) after each block: a block pools 2x2 while both sides are at least 4."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        sizes = []
        for _ in range(self.num_blocks):
            if min(h, w) >= 4:
                h, w = h // 2, w // 2
            sizes.append((h, w))
        return tuple(sizes)

    def slot_spatial(self, slot: str, image_size: int | tuple[int, int]) -> tuple[int, int]:
        return self.spatial_after(image_size)[self.slot_after[CANONICAL_SLOTS.index(slot)]]

    def slot_positions(self, slot: str, sample_shape: tuple[int, ...]) -> int:
        """Positions a seed in ``slot`` computes on per sample: its feature map's H*W."""
        h, w = self.slot_spatial(slot, (int(sample_shape[1]), int(sample_shape[2])))
        return h * w

    def param_count(self, sample_shape: tuple[int, ...] | int, num_classes: int) -> int:
        """Host parameters per env, for images ``(C, H, W)`` (or just ``C``)."""
        total = 0
        cin = sample_shape if isinstance(sample_shape, int) else int(sample_shape[0])
        for w in self.widths:
            total += w * cin * 9 + 2 * w
            cin = w
        return total + cin * num_classes + num_classes

    def init(self, keys: torch.Tensor, sample_shape: tuple[int, ...],
             num_classes: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return init_host(self, keys, int(sample_shape[0]), num_classes)

    def stem(self, params: dict[str, torch.Tensor], x: torch.Tensor, shared: bool) -> torch.Tensor:
        """Images to the grouped layout; a shared batch stays ``[B, C, H, W]`` (block 0's conv
        reads it once for every env)."""
        return x if shared else layers.to_grouped(x)

    def block(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
              new_buffers: dict[str, torch.Tensor], i: int, h: torch.Tensor, training: bool,
              shared_input: bool = False) -> torch.Tensor:
        return host_block(params, buffers, new_buffers, i, h, training, shared_input)

    def head(self, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return host_head(params, h)


HOST_PRESETS: dict[str, HostSpec | TransformerSpec] = {
    "minimal": HostSpec("minimal", base_width=2, num_blocks=3, slot_after=(0, 1, 2)),
    "impaired": HostSpec("impaired", base_width=4, num_blocks=3, slot_after=(0, 1, 2)),
    # One conv block with all three slots stacked after it: short of *depth*, which is what
    # residual seeds add (the narrow "impaired" host is short of first-layer width instead).
    "shallow": HostSpec("shallow", base_width=16, num_blocks=1, slot_after=(0, 0, 0)),
    "baseline": HostSpec("baseline", base_width=16, num_blocks=3, slot_after=(0, 1, 2)),
    "wide": HostSpec("wide", base_width=32, num_blocks=3, slot_after=(0, 1, 2)),
    "deep": HostSpec("deep", base_width=16, num_blocks=5, slot_after=(1, 2, 4)),
}


# Transformer hosts for the language-model tasks. ``lm_small`` is one narrow block with a
# thin MLP, its three slots stacked after it (short of depth and MLP width, which seeds add);
# ``lm_deep`` is lm_small's width with four blocks (what three block seeds could grow it into);
# ``lm_large`` is the several-times-larger host the capacity gap is measured against.
HOST_PRESETS.update({
    "lm_small": TransformerSpec("lm_small", d_model=16, num_blocks=1, heads=1, mlp_hidden=16, slot_after=(0, 0, 0)),
    "lm_deep": TransformerSpec("lm_deep", d_model=16, num_blocks=4, heads=1, mlp_hidden=16, slot_after=(1, 2, 3)),
    "lm_base": TransformerSpec("lm_base", d_model=64, num_blocks=2, heads=4, mlp_hidden=128, slot_after=(0, 1, 1)),
    "lm_large": TransformerSpec("lm_large", d_model=64, num_blocks=4, heads=4, mlp_hidden=256, slot_after=(1, 2, 3)),
})


def host_spec(name: str) -> HostSpec | TransformerSpec:
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
    if min(h.shape[-2:]) >= 4:  # any image size, square or not
        h = F.max_pool2d(h, 2)
    return h


def host_head(params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Global average pool and the per-env linear classifier: logits ``[N, B, K]``."""
    return layers.linear_head(h.mean(dim=(2, 3)), params["head.w"], params["head.b"])
