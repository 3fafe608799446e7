"""Observations: Kasmina's per-env signals plus on-device history, laid out by ObservationSchema.

Everything is ``[N, ...]`` tensor arithmetic: no loop over envs, no host sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from esper.leyline import (
    LIVE_STAGES,
    MEASURED_STAGES,
    NUM_OPS,
    NUM_STAGES,
    PRESENT_STAGES,
    ObservationSchema,
    SeedStage,
    stage_mask,
)
from esper.tamiyo.config import FeatureConfig

S = SeedStage
TRACKER_KEYS: tuple[str, ...] = (
    "val_loss_hist",
    "val_acc_hist",
    "best_val_acc",
    "plateau_epochs",
    "epochs_since_improvement",
    "epochs_since_cull",
    "seeds_fossilized",
    "seeds_culled",
    "last_op",
    "last_accepted",
    "prev_val_loss",
    "prev_val_acc",
    "prev_contribution",
    "obs_extra",
)


class RunningNorm(nn.Module):
    """Running mean/variance normalizer (Welford over batches); frozen in ``eval()``."""

    def __init__(self, size: int, eps: float = 1e-5, clip: float = 10.0) -> None:
        super().__init__()
        self.eps = eps
        self.clip = clip
        self.max_abs = 1e6  # features beyond this (a diverging env) are not folded into the statistics
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch ``[N, F]`` into the statistics.

        Rows with a non-finite or huge (``> max_abs``) feature are left out (one diverging
        env must not poison every env's observation); no host sync decides that.
        """
        ok = (torch.isfinite(x) & (x.abs() <= self.max_abs)).all(dim=1)
        all_ok = ok.all()
        w = ok.to(x.dtype).unsqueeze(1)
        xs = torch.where(ok.unsqueeze(1), x, torch.zeros_like(x))
        n_ok = w.sum()
        m_ok = (xs * w).sum(dim=0) / n_ok.clamp_min(1.0)
        v_ok = ((xs - m_ok).pow(2) * w).sum(dim=0) / n_ok.clamp_min(1.0)
        # All rows healthy (the usual case): exactly the plain batch statistics.
        n = torch.where(all_ok, float(x.shape[0]), n_ok)  # a scalar argument, not a host tensor
        b_mean = torch.where(all_ok, x.mean(dim=0), m_ok)
        b_var = torch.where(all_ok, x.var(dim=0, unbiased=False), v_ok)
        total = self.count + n
        safe = total.clamp_min(1.0)
        delta = b_mean - self.mean
        self.mean += delta * n / safe
        self.var.copy_(torch.where(total > 0, (self.var * self.count + b_var * n
                                               + delta.pow(2) * self.count * n / safe) / safe, self.var))
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x)
        z = ((x - self.mean) / (self.var + self.eps).sqrt()).clamp(-self.clip, self.clip)
        return torch.nan_to_num(z, nan=0.0)  # a non-finite feature never reaches the policy


def new_tracker(n: int, n_slots: int, history: int, device: torch.device | str, extras: int = 0) -> TensorDict:
    """Per-env history and counters at the start of an episode; ``obs_extra [N, extras]`` holds
    the latest observed diagnostics (schema extras), zero until the first epoch."""
    f = {"dtype": torch.float32, "device": device}
    lg = {"dtype": torch.long, "device": device}
    big = 1000
    return TensorDict(
        {
            "val_loss_hist": torch.zeros(n, history, **f),
            "val_acc_hist": torch.zeros(n, history, **f),
            "best_val_acc": torch.zeros(n, **f),
            "plateau_epochs": torch.zeros(n, **lg),
            "epochs_since_improvement": torch.zeros(n, **lg),
            "epochs_since_cull": torch.full((n,), big, **lg),
            "seeds_fossilized": torch.zeros(n, **lg),
            "seeds_culled": torch.zeros(n, **lg),
            "last_op": torch.zeros(n, **lg),
            "last_accepted": torch.ones(n, dtype=torch.bool, device=device),
            "prev_val_loss": torch.zeros(n, **f),
            "prev_val_acc": torch.zeros(n, **f),
            "prev_contribution": torch.zeros(n, n_slots, **f),
            "obs_extra": torch.zeros(n, extras, **f),
        },
        batch_size=[n],
        device=device,
    )


class FeatureBuilder(nn.Module):
    """Updates the tracker from each epoch's signals and builds the ``[N, F]`` observation."""

    def __init__(
        self,
        schema: ObservationSchema,
        host_params: float,
        episode_length: int,
        config: FeatureConfig | None = None,
        normalize: bool = True,
        blueprint_columns: list[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        """``blueprint_columns[b]``: the schema column of the run's blueprint ``b`` (identity when
        None; a run lays its blueprints over the schema's catalogue). ``num_classes`` scales
        losses by ``1 / ln(num_classes)`` (a uniform guess's loss), so an observation reads alike
        on 10 image classes and 256 bytes: a controller that transfers must not see the task's size."""
        super().__init__()
        self.schema = schema
        cols = blueprint_columns if blueprint_columns is not None else list(range(len(schema.blueprints)))
        self.register_buffer("_bp_columns", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.loss_scale = 1.0 / math.log(num_classes) if num_classes is not None and num_classes > 1 else 1.0
        self.host_params = host_params
        self.episode_length = episode_length
        self.config = config if config is not None else FeatureConfig()
        self.norm = RunningNorm(schema.size) if normalize else None
        self.register_buffer("live", stage_mask(LIVE_STAGES), persistent=False)
        self.register_buffer("present", stage_mask(PRESENT_STAGES), persistent=False)
        self.register_buffer("measured", stage_mask(MEASURED_STAGES), persistent=False)
        cols = []
        for slot in schema.slots:
            cols += [schema.index[f"{slot}.contribution"], schema.index[f"{slot}.contribution_velocity"]]
        self.register_buffer("_gated_cols", torch.tensor(cols), persistent=False)

    # ------------------------------------------------------------------------- tracker
    def update_tracker(self, tracker: TensorDict, signals: TensorDict, op: torch.Tensor,
                       extra: torch.Tensor | None = None) -> TensorDict:
        """The tracker after one epoch: histories shift, counters tick (a new TensorDict).
        ``extra [N, E]`` are the epoch's observed diagnostics (the schema's extras)."""
        first = signals["epoch"] <= 1
        val_loss, val_acc = signals["val_loss"], signals["val_acc"]
        prev_acc = torch.where(first, val_acc, tracker["val_acc_hist"][:, -1])
        best = torch.where(first, val_acc, tracker["best_val_acc"])
        improved = val_acc > best + self.config.improvement_delta
        flat = (val_acc - prev_acc) < self.config.plateau_delta
        stage, before = signals["stage"], signals["stage_before"]
        fossilized = ((stage == S.FOSSILIZED) & (before != S.FOSSILIZED)).sum(1)
        # A cull moves CULLED -> EMBARGOED within its epoch: count live seeds that left that way.
        culled = (((stage == S.CULLED) | (stage == S.EMBARGOED)) & self.live[before]).sum(1)
        zero = torch.zeros_like(tracker["plateau_epochs"])
        return TensorDict(
            {
                "val_loss_hist": torch.cat([tracker["val_loss_hist"][:, 1:], val_loss[:, None]], 1),
                "val_acc_hist": torch.cat([tracker["val_acc_hist"][:, 1:], val_acc[:, None]], 1),
                "best_val_acc": torch.maximum(best, val_acc),
                "plateau_epochs": torch.where(flat & ~first, tracker["plateau_epochs"] + 1, zero),
                "epochs_since_improvement": torch.where(
                    improved | first, zero, tracker["epochs_since_improvement"] + 1
                ),
                "epochs_since_cull": torch.where(culled > 0, zero, tracker["epochs_since_cull"] + 1),
                "seeds_fossilized": tracker["seeds_fossilized"] + fossilized,
                "seeds_culled": tracker["seeds_culled"] + culled,
                "last_op": op.long(),
                "last_accepted": signals["action_accepted"],
                "prev_val_loss": torch.where(first, val_loss, tracker["val_loss_hist"][:, -1]),
                "prev_val_acc": prev_acc,
                "prev_contribution": torch.where(self.measured[stage], signals["contribution"], 0.0),
                "obs_extra": extra if extra is not None else tracker["obs_extra"],
            },
            batch_size=tracker.batch_size,
            device=tracker.device,
        )

    # ------------------------------------------------------------------------- features
    def raw(self, tracker: TensorDict, signals: TensorDict) -> torch.Tensor:
        """Un-normalized ``[N, F]`` features in the schema's column order."""
        n = signals.batch_size[0]
        stage = signals["stage"]
        live = self.live[stage]
        acc = 0.01  # accuracy points -> fractions
        ls = self.loss_scale  # losses in units of a uniform guess's loss
        base = [
            (signals["epoch"].float() / self.episode_length)[:, None],
            ls * signals["train_loss"][:, None],
            ls * signals["val_loss"][:, None],
            acc * signals["train_acc"][:, None],
            acc * signals["val_acc"][:, None],
            acc * tracker["best_val_acc"][:, None],
            ls * (signals["val_loss"] - tracker["prev_val_loss"])[:, None],
            acc * (signals["val_acc"] - tracker["prev_val_acc"])[:, None],
            tracker["plateau_epochs"].float()[:, None],
            tracker["epochs_since_improvement"].float()[:, None],
            tracker["epochs_since_cull"].clamp(max=self.episode_length).float()[:, None],
            live.sum(1, keepdim=True).float(),
            tracker["seeds_fossilized"].float()[:, None],
            tracker["seeds_culled"].float()[:, None],
            torch.log1p(signals["params_added"] / self.host_params)[:, None],
            tracker["last_accepted"].float()[:, None],
            ls * tracker["val_loss_hist"],
            acc * tracker["val_acc_hist"],
            F.one_hot(tracker["last_op"], NUM_OPS).float(),
        ]
        alpha = signals["alpha"]
        measured = self.measured[stage]
        contribution = torch.where(measured, acc * signals["contribution"], 0.0)
        velocity = contribution - acc * tracker["prev_contribution"]
        present = self.present[stage]
        seed_grad = signals["seed_grad_norm"]
        ratio = seed_grad / signals["host_grad_norm"].clamp_min(1e-12)[:, None]
        healthy = torch.isfinite(seed_grad) & (seed_grad < self.config.grad_explode)
        slot_scalars = torch.stack(
            [
                alpha,
                contribution,
                torch.where(measured, velocity, 0.0),
                measured.float(),
                signals["epochs_in_stage"].float() / self.episode_length,
                signals["seed_age"].float() / self.episode_length,
                torch.where(live, torch.log1p(torch.nan_to_num(seed_grad, posinf=1e6)), 0.0),
                torch.where(live, torch.log1p(torch.nan_to_num(ratio, posinf=1e6)), 0.0),
                (healthy & live).float(),
            ],
            dim=-1,
        )  # [N, S, 9]
        bp = F.one_hot(self._bp_columns[signals["blueprint"]], len(self.schema.blueprints)).float() * present[..., None]
        per_slot = torch.cat([slot_scalars, F.one_hot(stage, NUM_STAGES).float(), bp], dim=-1)
        out = torch.cat([*base, per_slot.reshape(n, -1), tracker["obs_extra"]], dim=1)
        return torch.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6)

    def forward(self, tracker: TensorDict, signals: TensorDict) -> torch.Tensor:
        """Normalized features; unmeasured contributions stay exactly 0 after normalizing."""
        x = self.raw(tracker, signals)
        if self.norm is None:
            return x
        x = self.norm(x)
        keep = torch.ones_like(x)
        measured = self.measured[signals["stage"]]  # [N, S]
        keep[:, self._gated_cols] = measured.float().repeat_interleave(2, dim=1)
        return x * keep
