"""One training step for all N envs: forward, per-env loss, backward, clip, SGD.

Functional (``torch.func.grad``) so the whole step, backward and optimizer included, is one
``torch.compile(fullgraph=True)`` graph; ``loss.backward()`` would break it. Stage, alpha and
blueprint arrive as tensors, and a plan's groups as index tensors of dynamic size, so neither a
lifecycle change nor a new plan recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import esper_kernels
from esper.kasmina.model import Architecture, Controls, Plans, SeedParams, Tensors, forward_train


@dataclass(frozen=True)
class StepHyper:
    """Optimizer settings shared by all envs (per-env seed learning rates come in Controls)."""

    host_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_grad_norm: float = 5.0
    # "sgd": Nesterov SGD (the CNN hosts'). "adamw": Adam with decoupled weight decay, for
    # transformer hosts, which SGD trains poorly (measured: README, language-model hosts).
    optimizer: str = "sgd"
    beta2: float = 0.99  # AdamW's second-moment decay (its first is ``momentum``)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer {self.optimizer!r} is not one of: sgd, adamw")


# ``grad_stats`` also counts vanishing/exploding elements, which the step never reads (it uses
# the total norm for clipping and the non-finite counts); telemetry's gradient statistics use
# the profile's thresholds instead. These only fill the kernel's arguments.
_UNREAD_THRESHOLDS = (1e-7, 1e3)


def _sgd_(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor, hp: StepHyper) -> None:
    """Nesterov SGD with weight decay, in place; ``lr`` is per env ``[N]``."""
    lr_b = lr.view(-1, *([1] * (p.dim() - 1)))
    d = g + hp.weight_decay * p
    buf.mul_(hp.momentum).add_(d)
    p.sub_(lr_b * (d + hp.momentum * buf))


def _adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
            t: torch.Tensor, hp: StepHyper) -> None:
    """AdamW in place, bias-corrected by each env's own step count ``t [N]`` (>= 1)."""
    shape = (-1, *([1] * (p.dim() - 1)))
    b1, b2 = hp.momentum, hp.beta2
    m.mul_(b1).add_((1 - b1) * g)
    v.mul_(b2).add_((1 - b2) * g * g)
    m_hat = m / (1 - b1 ** t).view(shape)
    v_hat = v / (1 - b2 ** t).view(shape)
    lr_b = lr.view(shape)
    p.mul_(1 - lr_b * hp.weight_decay).sub_(lr_b * m_hat / (v_hat.sqrt() + hp.eps))


def _update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor | None, lr: torch.Tensor,
             t: torch.Tensor | None, hp: StepHyper) -> None:
    if v is None or t is None:
        _sgd_(p, g, m, lr, hp)
    else:
        _adamw_(p, g, m, v, lr, t, hp)


def _scale(grads: Tensors, coef: torch.Tensor) -> Tensors:
    return {k: g * coef.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


def train_step(
    arch: Architecture,
    hp: StepHyper,
    params: Tensors,
    buffers: Tensors,
    seeds: SeedParams,
    host_mom: Tensors,
    seed_mom: SeedParams,
    ctrl: Controls,
    x: torch.Tensor,
    y: torch.Tensor,
    capture: frozenset[str] = frozenset(),
    plans: Plans | None = None,
    host_sq: Tensors | None = None,
    seed_sq: SeedParams | None = None,
) -> Tensors:
    """Train every env on its own minibatch ``x [N, B, ...]``, ``y [N, B, ...]``, in place.

    Returns per-env metrics (all tensors, nothing leaves the device): ``loss [N]``,
    ``correct [N]`` (targets predicted right: images or tokens), host gradient norm ``[N]``
    and non-finite counts ``[N, L]`` (from the one
    ``grad_stats`` pass that also feeds clipping), and per-slot seed gradient norms ``[N, S]``.
    With ``hp.optimizer == "adamw"``, ``host_sq``/``seed_sq`` hold the second moments and
    ``ctrl["host"]["t"]``/``ctrl[slot]["t"]`` each env's step count for bias correction.
    ``capture`` (static: each set is its own graph; compiled batches use one set) may ask for the
    raw host gradients (``"grads"`` -> ``grad.<name>``) and block activations
    (``"activations"`` -> ``act.<i>``, ``[B, N, C, H, W]``) for telemetry.
    """
    n = y.shape[0]

    def loss_fn(p: Tensors, s: SeedParams) -> tuple[torch.Tensor, tuple]:
        acts: list[torch.Tensor] | None = [] if "activations" in capture else None
        logits, new_buffers = forward_train(arch, p, buffers, s, ctrl, x, acts, plans)
        # One target per image, or one per token: either way a mean over the env's targets.
        per_target = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        per_env = per_target.view(n, -1).mean(dim=1)
        correct = (logits.detach().argmax(dim=-1) == y).reshape(n, -1).sum(dim=1)
        # Summing per-env mean losses keeps every env's gradient its own.
        return per_env.sum(), (per_env.detach(), correct, new_buffers, acts or [])

    # With a plan only the planned blueprints run, so only they are differentiated and updated.
    trained = seeds if plans is None else {slot: {bp: seeds[slot][bp] for bp in plans[slot]} for slot in seeds}
    (g_host, g_seeds), (loss, correct, new_buffers, acts) = torch.func.grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(params, trained)
    raw_host = g_host
    host_names = list(params)
    stats = esper_kernels.grad_stats([g_host[k] for k in host_names], *_UNREAD_THRESHOLDS)
    g_host = _scale(g_host, esper_kernels.clip_coefficients(stats.total_norm, hp.max_grad_norm))
    seed_norms = []
    with torch.no_grad():
        adam = hp.optimizer == "adamw"
        for k in host_names:
            _update_(params[k], g_host[k], host_mom[k], host_sq[k] if adam and host_sq else None,
                     ctrl["host"]["lr"], ctrl["host"].get("t"), hp)
        for k, v in new_buffers.items():
            buffers[k].copy_(v)
        for slot in arch.slots:
            flat = [g for bp in g_seeds[slot].values() for g in bp.values()]
            sq = [g.reshape(n, -1).pow(2).sum(dim=1) for g in flat]
            norm = torch.stack(sq).sum(dim=0).sqrt() if sq else torch.zeros(n, device=y.device)
            seed_norms.append(norm)
            coef = esper_kernels.clip_coefficients(norm, hp.max_grad_norm)
            for bp_name, bp_grads in g_seeds[slot].items():
                for k, g in _scale(bp_grads, coef).items():
                    v = seed_sq[slot][bp_name][k] if adam and seed_sq else None
                    _update_(seeds[slot][bp_name][k], g, seed_mom[slot][bp_name][k], v, ctrl[slot]["lr"],
                             ctrl[slot].get("t"), hp)
    captured: Tensors = {}
    if "grads" in capture:
        captured.update({f"grad.{k}": raw_host[k] for k in host_names})
    if acts:
        captured.update({f"act.{i}": a for i, a in enumerate(acts)})
    return {
        **captured,
        "loss": loss,
        "correct": correct,
        "grad_nonfinite": stats.nonfinite,
        "host_grad_norm": stats.total_norm,
        "seed_grad_norm": torch.stack(seed_norms, dim=1),
    }
