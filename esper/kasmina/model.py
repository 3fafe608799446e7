"""The morphogenetic forward pass: host blocks with seeds blended in at the slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import esper_kernels
from esper.kasmina import layers
from esper.kasmina.blueprints import Blueprint
from esper.kasmina.hosts import HostSpec
from esper.kasmina.transformer import TransformerSpec
from esper.leyline import CANONICAL_SLOTS

Tensors = dict[str, torch.Tensor]
SeedParams = dict[str, dict[str, Tensors]]  # slot -> blueprint -> name -> [N, ...]
Controls = dict[str, Tensors]  # slot -> {alpha, isolated, lr, onehot}
# slot -> blueprint -> (env indices [k], valid [k]): the envs whose seed computes, gathered
# (rows where ``valid`` is False are padding: they compute but are masked out).
Group = tuple[torch.Tensor, torch.Tensor]
Plans = dict[str, dict[str, Group]]


@dataclass(frozen=True)
class Architecture:
    """Static description of the batched model: host, slots in use, blueprint set, N."""

    spec: HostSpec | TransformerSpec
    slots: tuple[str, ...]
    blueprints: tuple[Blueprint, ...]
    n_envs: int

    def slots_after_block(self, i: int) -> list[str]:
        return [s for s in self.slots if self.spec.slot_after[CANONICAL_SLOTS.index(s)] == i]


def _grouped_delta(bp: Blueprint, params: Tensors, hv_in: torch.Tensor, group: Group) -> torch.Tensor:
    """``delta`` of one blueprint for the group's envs only: ``[B, k, C, H, W]``, zero on
    padding rows (``where``, not a product, so a padding row's NaN never leaks)."""
    envs, valid = group
    b, _, c, hh, ww = hv_in.shape
    k = envs.shape[0]
    x = hv_in.index_select(1, envs).reshape(b, k * c, hh, ww)
    sub = {name: v.index_select(0, envs) for name, v in params.items()}
    delta = bp.delta(sub, x, k).view(b, k, c, hh, ww)
    return torch.where(valid.view(1, k, 1, 1, 1), delta, 0.0)


def apply_slot(
    arch: Architecture,
    h: torch.Tensor,
    seeds: dict[str, Tensors],
    ctrl: Tensors,
    plan: dict[str, Group] | None = None,
) -> torch.Tensor:
    """One slot for all envs: seed ``s = h_in + delta(h_in)``, then blend per env.

    Isolated envs (TRAINING) feed the seed ``h.detach()`` and add it straight-through, so the
    output value is the host's and the host's gradient is untouched; blended envs output
    ``h + alpha * (s - h)``.

    Without ``plan`` every blueprint runs for every env, masked by the env's one-hot (static
    shapes, but every blueprint for every env). With ``plan`` (blueprint name -> the group of
    envs whose seed computes) each blueprint runs just for its envs; compiled, the group sizes
    are symbolic, so one graph serves every plan.
    """
    n = arch.n_envs
    hv = layers.env_view(h, n)
    iso = layers.per_env(ctrl["isolated"], 5, 1) > 0
    # ``where`` (not ``h - iso * (h - h.detach())``) so the host's gradient is bit-identical.
    hv_in = torch.where(iso, hv.detach(), hv)
    h_in = hv_in.view(h.shape)
    sv = hv_in
    for b, bp in enumerate(arch.blueprints):
        if bp.identity:
            continue
        if plan is None:
            weight = layers.per_env(ctrl["onehot"][:, b], 5, 1)
            sv = sv + weight * layers.env_view(bp.delta(seeds[bp.name], h_in, n), n)
        elif bp.name in plan:
            group = plan[bp.name]
            sv = sv.index_add(1, group[0], _grouped_delta(bp, seeds[bp.name], hv_in, group))
    out = esper_kernels.blend(hv, sv, ctrl["alpha"], env_dim=1)
    st_seed = sv * layers.per_env(ctrl["isolated"], 5, 1)
    out = esper_kernels.straight_through(out, st_seed)
    return out.reshape(h.shape)


def forward_train(
    arch: Architecture,
    params: Tensors,
    buffers: Tensors,
    seeds: SeedParams,
    ctrl: Controls,
    x: torch.Tensor,
    activations: list[torch.Tensor] | None = None,
    plans: Plans | None = None,
) -> tuple[torch.Tensor, Tensors]:
    """Training forward on per-env batches ``x [N, B, ...]``: logits ``[N, B, K]`` (images
``[N, B, C, H, W]``) or ``[N, B, L, K]`` (token sequences ``[N, B, L]``).

    With ``activations`` given, each block's output (after its slots) is appended to it as a
    detached ``[B, N, C, H, W]`` view, for telemetry captured inside the compiled step.
    """
    spec = arch.spec
    h = spec.stem(params, x, shared=False)
    new_buffers: Tensors = {}
    for i in range(spec.num_blocks):
        h = spec.block(params, buffers, new_buffers, i, h, training=True)
        for slot in arch.slots_after_block(i):
            h = apply_slot(arch, h, seeds[slot], ctrl[slot], plans[slot] if plans is not None else None)
        if activations is not None:
            activations.append(layers.env_view(h.detach(), arch.n_envs))
    return spec.head(params, h), new_buffers


def forward_eval(
    arch: Architecture,
    params: Tensors,
    buffers: Tensors,
    seeds: SeedParams,
    ctrl: Controls,
    x: torch.Tensor,
    plans: Plans | None = None,
    counterfactuals: bool = True,
) -> torch.Tensor:
    """Validation on one batch ``x [B, ...]`` shared by all envs, with counterfactuals.

    Returns logits ``[1 + S, N, B, K]`` (``[1 + S, N, B, L, K]`` for sequences): row 0 the actual model, row ``1 + k`` the model with
    slot ``k``'s seed removed (alpha forced to 0). Counterfactual rows share the computation
    up to their slot: each branches off as extra batch rows where its slot is reached. Without
    ``counterfactuals`` only the actual model runs: ``[1, N, B, K]``.
    """
    b = x.shape[0]
    spec = arch.spec
    h = spec.stem(params, x, shared=True)
    unused: Tensors = {}
    for i in range(spec.num_blocks):
        h = spec.block(params, buffers, unused, i, h, training=False, shared_input=i == 0)
        for slot in arch.slots_after_block(i):
            plan = plans[slot] if plans is not None else None
            out = apply_slot(arch, h, seeds[slot], ctrl[slot], plan)
            h = torch.cat([out, h[:b]], dim=0) if counterfactuals else out
    logits = spec.head(params, h)  # [N, rows*B, (L,) K]
    return logits.view(logits.shape[0], -1, b, *logits.shape[2:]).transpose(0, 1)
