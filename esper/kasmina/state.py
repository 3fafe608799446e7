"""The batched state of N envs: parameters, optimizer state and slot states in one TensorDict."""

from __future__ import annotations

from collections.abc import Collection

import torch
from tensordict import TensorDict

from esper import rng
from esper.kasmina.model import Architecture
from esper.kasmina.slots import new_slot_state
from esper.leyline import CANONICAL_SLOTS


def init_seeds(
    arch: Architecture, keys: torch.Tensor, slot: str, germination: torch.Tensor,
    only: Collection[int] | None = None,
) -> TensorDict:
    """Fresh parameters of every blueprint (or the indices in ``only``) for one slot, keyed by
    env and germination count: a blueprint's values do not depend on which others are made."""
    c = arch.spec.slot_channels(slot)
    slot_keys = rng.stream_key(keys, 500 + CANONICAL_SLOTS.index(slot), germination)
    out = {}
    for b, bp in enumerate(arch.blueprints):
        if only is None or b in only:
            out[bp.name] = TensorDict(bp.init(rng.stream_key(slot_keys, b), c), batch_size=[keys.shape[0]])
    return TensorDict(out, batch_size=[keys.shape[0]])


def init_state(
    arch: Architecture, keys: torch.Tensor, sample_shape: tuple[int, ...] | int, num_classes: int,
    second_moments: bool = False,
) -> TensorDict:
    """Everything an env owns, with a leading env dimension ``[N]``.

    ``sample_shape`` is one input's shape (``(C, H, W)`` or ``(L,)``; an int is a CNN's
    channel count). ``second_moments`` adds AdamW's ``host_sq``/``seed_sq``."""
    n = keys.shape[0]
    shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
    params, buffers = arch.spec.init(keys, shape, num_classes)
    zeros = torch.zeros(n, dtype=torch.long, device=keys.device)
    seeds = TensorDict(
        {slot: init_seeds(arch, keys, slot, zeros) for slot in arch.slots}, batch_size=[n]
    )
    host = TensorDict(params, batch_size=[n])
    return TensorDict(
        {
            "host": host,
            "buffers": TensorDict(buffers, batch_size=[n]),
            "seeds": seeds,
            "host_mom": host.apply(torch.zeros_like),
            "seed_mom": seeds.apply(torch.zeros_like),
            **({"host_sq": host.apply(torch.zeros_like), "seed_sq": seeds.apply(torch.zeros_like)}
               if second_moments else {}),
            "slots": TensorDict({s: new_slot_state(n, keys.device) for s in arch.slots}, batch_size=[n]),
        },
        batch_size=[n],
        device=keys.device,
    )


def as_dicts(td: TensorDict) -> dict:
    """Nested plain dicts of the same tensors (no copies), for the compiled step."""
    return {k: as_dicts(v) if isinstance(v, TensorDict) else v for k, v in td.items()}


def where_envs(mask: torch.Tensor, new: TensorDict, old: TensorDict) -> None:
    """In place: ``old[i] = new[i]`` for envs where ``mask[i]``, for every leaf of ``new``."""
    for key, fresh in new.items(include_nested=True, leaves_only=True):
        value = old.get(key)
        m = mask.view(-1, *([1] * (value.dim() - 1)))
        value.copy_(torch.where(m, fresh, value))
