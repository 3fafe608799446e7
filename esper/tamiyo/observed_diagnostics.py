"""Observation extras: the diagnostics a richer telemetry profile collects, as features.

Seed 003 ("rich telemetry"): base features always, extras appended when the profile collects
them, so a policy can learn *why* a host stalls (vanishing gradients in one layer, one class
lagging) and not only that it does. ``features.observe`` names the profile; its gradient and
per-class settings pick the columns:

* ``gradients.track_norm`` -> ``grad_log_norm.<layer>``: log of each host layer's gradient norm
  on the epoch's last training step;
* ``gradients.track_std`` -> ``grad_log_std.<layer>``: log of its standard deviation;
* ``per_class.track_accuracy`` -> ``class_acc.<k>``: validation accuracy of class k (fraction);
* ``per_class.track_loss`` -> ``class_loss.<k>``: its mean validation cross-entropy.

Loss-landscape probes are never observed: they cost ``2 * samples + 1`` extra validation passes
per epoch (research profile: +161 % epoch time measured, README "Telemetry overhead").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDictBase

from esper.nissa import TelemetryConfig
from esper.nissa.diagnostics import gradient_stats, per_class_metrics

_EPS = 1e-12


class ObservedDiagnostics:
    """Names, required captures and the ``[N, E]`` values of one profile's observed extras."""

    def __init__(self, profile: TelemetryConfig, host_layers: Sequence[str], num_classes: int) -> None:
        g, pc = profile.gradients, profile.per_class
        layers = tuple(host_layers) if g.layers == "all" else tuple(g.layers)
        unknown = sorted(set(layers) - set(host_layers))
        if unknown:
            raise ValueError(
                f"telemetry profile {profile.name!r} observes gradients of unknown layers {unknown}; "
                f"host layers: {list(host_layers)}"
            )
        self.profile = profile.name
        self.layers = layers
        self.grad_norm = g.enabled and g.track_norm
        self.grad_std = g.enabled and g.track_std
        self.class_acc = pc.enabled and pc.track_accuracy
        self.class_loss = pc.enabled and pc.track_loss
        self.num_classes = num_classes
        names: list[str] = []
        if self.grad_norm:
            names += [f"grad_log_norm.{k}" for k in layers]
        if self.grad_std:
            names += [f"grad_log_std.{k}" for k in layers]
        if self.class_acc:
            names += [f"class_acc.{k}" for k in range(num_classes)]
        if self.class_loss:
            names += [f"class_loss.{k}" for k in range(num_classes)]
        self.names: tuple[str, ...] = tuple(names)

    @property
    def captures(self) -> frozenset[str]:
        """What Kasmina must capture in each epoch for these features."""
        out = set()
        if self.grad_norm or self.grad_std:
            out.add("grads")
        if self.class_acc or self.class_loss:
            out.add("logits")
        return frozenset(out)

    def __call__(self, captured: TensorDictBase | None, val_labels: torch.Tensor, n: int) -> torch.Tensor:
        """The extras ``[N, E]`` from one epoch's captures (all on the device, no sync)."""
        if not self.names:
            return torch.zeros(n, 0, device=val_labels.device)
        if captured is None:
            raise ValueError(f"observed diagnostics of profile {self.profile!r} need captures {sorted(self.captures)}")
        cols: list[torch.Tensor] = []
        if self.grad_norm or self.grad_std:
            stats = gradient_stats([captured.get(f"grad.{k}") for k in self.layers], 0.0, float("inf"))
            if self.grad_norm:
                cols.append(torch.log(stats["norm"] + _EPS))
            if self.grad_std:
                cols.append(torch.log(stats["std"] + _EPS))
        if self.class_acc or self.class_loss:
            m = per_class_metrics(captured.get("val_logits"), val_labels, accuracy=self.class_acc,
                                  loss=self.class_loss, confusion=False)
            if self.class_acc:
                cols.append(m["accuracy"])
            if self.class_loss:
                cols.append(m["loss"])
        # A class absent from the validation split (NaN) reads 0, like every unmeasured feature.
        return torch.nan_to_num(torch.cat(cols, dim=1), nan=0.0, posinf=1e6, neginf=-1e6)
