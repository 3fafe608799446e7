"""Batched on-device diagnostics: every function takes [N, ...] tensors and returns tensors.

Nothing here converts a tensor to a Python value; ``materialize`` does the one transfer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict

import esper_kernels
from esper.nissa.config import TelemetryConfig

GradInput = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

# Inputs DiagnosticTracker.collect may need; see DiagnosticTracker.required_inputs.
INPUT_GRADS = "grads"
INPUT_LOGITS = "logits"
INPUT_LABELS = "labels"
INPUT_PARAMS = "params"
INPUT_ACTIVATIONS = "activations"
INPUT_LOSS_FN = "loss_fn"


def gradient_stats(
    grads: Sequence[torch.Tensor], vanishing_threshold: float, exploding_threshold: float
) -> TensorDict:
    """Per-env, per-layer gradient statistics via ``esper_kernels.grad_stats``.

    Returns a TensorDict (batch [N]) with norm, mean, std, max_abs, frac_vanishing,
    frac_exploding, nonfinite ([N, L]) and total_norm ([N]).
    """
    s = esper_kernels.grad_stats(list(grads), vanishing_threshold, exploding_threshold)
    n = s.total_norm.shape[0]
    return TensorDict(
        {
            "norm": s.norm,
            "mean": s.mean,
            "std": s.std,
            "max_abs": s.max_abs,
            "frac_vanishing": s.frac_vanishing,
            "frac_exploding": s.frac_exploding,
            "nonfinite": s.nonfinite,
            "total_norm": s.total_norm,
        },
        batch_size=[n],
    )


def per_class_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    accuracy: bool = True,
    loss: bool = True,
    confusion: bool = True,
) -> TensorDict:
    """Per-class accuracy / mean loss ([N, K], NaN for absent classes), counts and confusion.

    ``logits`` is [N, B, K]; ``labels`` is [B] (shared) or [N, B]. Confusion is
    [N, K_true, K_pred] counts.
    """
    n, b, k = logits.shape
    labels = labels.expand(n, b) if labels.dim() == 1 else labels
    onehot = F.one_hot(labels, k).to(logits.dtype)  # [N, B, K]
    count = onehot.sum(dim=1)  # [N, K]
    present = count > 0
    denom = count.clamp_min(1.0)
    nan = torch.full_like(count, float("nan"))
    out: dict[str, torch.Tensor] = {"count": count}
    pred = logits.argmax(dim=-1)  # [N, B]
    if accuracy:
        correct = (pred == labels).to(logits.dtype).unsqueeze(-1)  # [N, B, 1]
        out["accuracy"] = torch.where(present, (onehot * correct).sum(dim=1) / denom, nan)
    if loss:
        ce = F.cross_entropy(logits.reshape(n * b, k), labels.reshape(n * b), reduction="none")
        ce = ce.reshape(n, b, 1).to(logits.dtype)
        out["loss"] = torch.where(present, (onehot * ce).sum(dim=1) / denom, nan)
    if confusion:
        pred_onehot = F.one_hot(pred, k).to(logits.dtype)
        out["confusion"] = torch.einsum("nbk,nbj->nkj", onehot, pred_onehot)
    return TensorDict(out, batch_size=[n])


def weight_norms(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each [N, ...] parameter per env: [N, P]."""
    return torch.stack(
        [torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1), dim=1) for p in params],
        dim=1,
    )


def activation_stats(activations: Sequence[torch.Tensor], env_dim: int = 0) -> TensorDict:
    """Mean, std and fraction of exact zeros per env for each activation: [N, A] each.

    Activations are [N, ...] (``env_dim=0``) or [B, N, ...] (``env_dim=1``).
    """
    if env_dim not in (0, 1):
        raise ValueError(f"env_dim must be 0 or 1, got {env_dim}")
    flat = [a.detach().movedim(env_dim, 0).flatten(1).float() for a in activations]
    mean = torch.stack([a.mean(dim=1) for a in flat], dim=1)
    std = torch.stack([a.std(dim=1, correction=0) for a in flat], dim=1)
    frac_zero = torch.stack([(a == 0).float().mean(dim=1) for a in flat], dim=1)
    return TensorDict(
        {"mean": mean, "std": std, "frac_zero": frac_zero}, batch_size=[mean.shape[0]]
    )


@torch.no_grad()
def loss_sharpness(
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    samples: int,
    scale: float,
    generator: torch.Generator | None = None,
) -> TensorDict:
    """Loss-landscape sharpness by random perturbation, all envs per call.

    Each of ``samples`` draws a Gaussian direction ``e`` per [N, ...] parameter, rescaled so
    its per-env norm is ``scale * ||p_env||``, and evaluates ``loss_fn`` at ``p + e`` and
    ``p - e`` (antithetic pair: the first-order term cancels, leaving curvature), so
    ``loss_fn`` is called ``2 * samples + 1`` times, each for all envs at once.
    Returns base_loss, sharpness (mean of ``(L(p+e) + L(p-e)) / 2 - L(p)``), max_increase and
    loss_std (over all perturbed losses), all [N].
    """
    params = [p.detach() for p in params]
    base = loss_fn(params)
    n = base.shape[0]
    plus, minus = [], []
    for _ in range(samples):
        steps = []
        for p in params:
            noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            shape = (p.shape[0],) + (1,) * (p.dim() - 1)
            p_norm = torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=1).reshape(shape)
            e_norm = torch.linalg.vector_norm(noise.reshape(p.shape[0], -1), dim=1).reshape(shape)
            steps.append(noise * (scale * p_norm / e_norm.clamp_min(1e-12)))
        plus.append(loss_fn([p + e for p, e in zip(params, steps, strict=True)]))
        minus.append(loss_fn([p - e for p, e in zip(params, steps, strict=True)]))
    losses = torch.stack(plus + minus)  # [2k, N]
    increase = losses - base.unsqueeze(0)
    curvature = (torch.stack(plus) + torch.stack(minus)) / 2 - base.unsqueeze(0)
    return TensorDict(
        {
            "base_loss": base,
            "sharpness": curvature.mean(dim=0),
            "max_increase": increase.amax(dim=0),
            "loss_std": losses.std(dim=0, correction=0),
        },
        batch_size=[n],
    )


_QUANTILES: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _quantiles(percentiles: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``percentiles / 100`` on ``device``, made once per (profile, device): trackers are made
    every epoch, and a fresh tensor each time would be a host-to-device copy per epoch."""
    key = (percentiles, device)
    if key not in _QUANTILES:
        _QUANTILES[key] = torch.tensor([q / 100.0 for q in percentiles], dtype=torch.float32, device=device)
    return _QUANTILES[key]


class DiagnosticTracker:
    """Builds the per-epoch telemetry TensorDict (batch [N]) with exactly what a profile enables.

    Layout (keys present only when the profile enables them):
    ``metrics.*`` (always: the per-env core metrics passed in),
    ``gradients.{total_norm,norm,mean,std,max_abs,frac_vanishing,frac_exploding,nonfinite,
    percentiles,histogram}``, ``per_class.{count,accuracy,loss,confusion}``,
    ``weights.norm``, ``activations.{mean,std,frac_zero}``,
    ``landscape.{base_loss,loss_std,sharpness,max_increase}``.
    """

    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self.layer_names: list[str] = []

    @property
    def required_inputs(self) -> frozenset[str]:
        """Which ``collect`` arguments the active profile needs (skip computing the others)."""
        c = self.config
        need: set[str] = set()
        if c.gradients.enabled:
            need.add(INPUT_GRADS)
        if c.per_class.enabled:
            need |= {INPUT_LOGITS, INPUT_LABELS}
        if c.track_weight_norms:
            need.add(INPUT_PARAMS)
        if c.track_activation_stats:
            need.add(INPUT_ACTIVATIONS)
        if c.loss_landscape.enabled:
            need |= {INPUT_PARAMS, INPUT_LOSS_FN}
        return frozenset(need)

    def _select_layers(self, grads: GradInput) -> list[torch.Tensor]:
        if isinstance(grads, Mapping):
            names, tensors = list(grads.keys()), list(grads.values())
        else:
            tensors = list(grads)
            names = [str(i) for i in range(len(tensors))]
        wanted = self.config.gradients.layers
        if wanted == "all":
            self.layer_names = names
            return tensors
        missing = [w for w in wanted if w not in names]
        if missing:
            raise KeyError(f"gradients.layers names unknown layers {missing}; known: {names}")
        index = {name: i for i, name in enumerate(names)}
        self.layer_names = list(wanted)
        return [tensors[index[w]] for w in wanted]

    def _gradients(self, grads: GradInput) -> TensorDict:
        g = self.config.gradients
        selected = self._select_layers(grads)
        stats = gradient_stats(selected, g.vanishing_threshold, g.exploding_threshold)
        keep = ["nonfinite"]
        if g.track_norm:
            keep += ["total_norm", "norm"]
        if g.track_std:
            keep += ["mean", "std"]
        if g.detect_vanishing:
            keep.append("frac_vanishing")
        if g.detect_exploding:
            keep += ["frac_exploding", "max_abs"]
        out = stats.select(*keep)
        if g.percentiles:
            qs = _quantiles(tuple(g.percentiles), selected[0].device)
            out["percentiles"] = esper_kernels.grad_percentiles(selected, qs)
        if g.full_histogram:
            out["histogram"] = esper_kernels.grad_histogram(
                selected, g.histogram_bins, g.histogram_range
            )
        return out

    def collect(
        self,
        *,
        metrics: Mapping[str, torch.Tensor] | None = None,
        grads: GradInput | None = None,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        params: Sequence[torch.Tensor] | None = None,
        activations: Sequence[torch.Tensor] | None = None,
        activation_env_dim: int = 0,
        loss_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> TensorDict:
        """Compute the enabled diagnostics from one training step's outputs.

        ``metrics`` are per-env [N] core values (e.g. train_loss, val_loss, val_accuracy) and
        are always kept. An input the profile needs but that is missing raises ``ValueError``.
        """
        given = {
            INPUT_GRADS: grads,
            INPUT_LOGITS: logits,
            INPUT_LABELS: labels,
            INPUT_PARAMS: params,
            INPUT_ACTIVATIONS: activations,
            INPUT_LOSS_FN: loss_fn,
        }
        missing = sorted(k for k in self.required_inputs if given[k] is None)
        if missing:
            raise ValueError(
                f"telemetry profile {self.config.name!r} needs inputs {missing} for collect()"
            )
        c = self.config
        parts: dict[str, dict[str, torch.Tensor]] = {}
        if metrics:
            parts["metrics"] = dict(metrics)
        if c.gradients.enabled and grads is not None:
            parts["gradients"] = self._gradients(grads).to_dict()
        if c.per_class.enabled and logits is not None and labels is not None:
            pc = c.per_class
            parts["per_class"] = per_class_metrics(
                logits,
                labels,
                accuracy=pc.track_accuracy,
                loss=pc.track_loss,
                confusion=pc.track_confusion,
            ).to_dict()
        if c.track_weight_norms and params is not None:
            parts["weights"] = {"norm": weight_norms(params)}
        if c.track_activation_stats and activations is not None:
            parts["activations"] = activation_stats(activations, activation_env_dim).to_dict()
        if c.loss_landscape.enabled and loss_fn is not None and params is not None:
            ll = c.loss_landscape
            land = loss_sharpness(
                loss_fn,
                params,
                samples=ll.perturbation_samples,
                scale=ll.perturbation_scale,
                generator=generator,
            )
            keep = ["base_loss", "loss_std"]
            if ll.estimate_sharpness:
                keep += ["sharpness", "max_increase"]
            parts["landscape"] = land.select(*keep).to_dict()
        leaves = [t for group in parts.values() for t in group.values()]
        batch = [leaves[0].shape[0]] if leaves else []
        return TensorDict(parts, batch_size=batch)
