"""Anomaly detectors over host values (after ``materialize``) and profile escalation.

Detectors take floats or per-env numpy arrays and return ``AnomalyEvent``s. Severe events set
``payload["escalate"] = True``; ``EscalationState`` then switches to the profile's
``escalate_to`` profile for ``escalation_epochs`` epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from tensordict import TensorDict

from esper.leyline.events import AnomalyEvent, EventKind
from esper.nissa.config import TelemetryConfig, load_profile

INFO, WARNING, SEVERE = "info", "warning", "severe"
PPO_SCOPE = "ppo_update"  # payload["scope"] of events about a PPO update, not a host env


def _event(
    detector: str, severity: str, message: str, env: int, epoch: int, **payload: object
) -> AnomalyEvent:
    payload["escalate"] = severity == SEVERE
    return AnomalyEvent(
        kind=EventKind.ANOMALY,
        env=env,
        epoch=epoch,
        payload=payload,
        detector=detector,
        severity=severity,
        message=message,
    )


def _as_envs(values: float | np.ndarray) -> tuple[np.ndarray, bool]:
    arr = np.asarray(values, dtype=np.float64)
    return arr.reshape(-1), arr.ndim == 0


class GradientDriftDetector:
    """Gradient-norm drift against a bias-corrected EMA (per env, or one scalar stream).

    ``ema_hat = m_t / (1 - beta**t)`` with ``m_t = beta * m_{t-1} + (1 - beta) * x_t``.
    After ``warmup`` updates, a norm above ``ratio`` x (or below 1/``ratio`` x) the EMA of the
    previous steps is a warning; a non-finite norm is severe.
    """

    def __init__(self, beta: float = 0.9, ratio: float = 3.0, warmup: int = 5) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError("beta must be in (0, 1)")
        if ratio <= 1.0:
            raise ValueError("ratio must be > 1")
        self.beta, self.ratio, self.warmup = beta, ratio, warmup
        self._m: np.ndarray | None = None
        self._t: np.ndarray | None = None

    @property
    def ema(self) -> np.ndarray:
        """Bias-corrected EMA per stream (NaN before the first finite value)."""
        if self._m is None or self._t is None:
            return np.array([np.nan])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._t > 0, self._m / (1.0 - self.beta**self._t), np.nan)

    def update(self, norms: float | np.ndarray, epoch: int = -1) -> list[AnomalyEvent]:
        x, scalar = _as_envs(norms)
        if self._m is None or self._t is None or self._m.shape != x.shape:
            self._m, self._t = np.zeros_like(x), np.zeros_like(x)
        prev = self.ema
        events: list[AnomalyEvent] = []
        finite = np.isfinite(x)
        for i in np.flatnonzero(~finite):
            env = -1 if scalar else int(i)
            events.append(
                _event("gradient_drift", SEVERE, "non-finite gradient norm", env, epoch, norm=None)
            )
        warm = finite & (self._t >= self.warmup) & (prev > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(warm, x / prev, 1.0)
        for i in np.flatnonzero(warm & ((r > self.ratio) | (r < 1.0 / self.ratio))):
            env = -1 if scalar else int(i)
            direction = "above" if r[i] > 1 else "below"
            events.append(
                _event(
                    "gradient_drift",
                    WARNING,
                    f"gradient norm {x[i]:.3g} is {r[i]:.2f}x the EMA {prev[i]:.3g} ({direction})",
                    env,
                    epoch,
                    norm=float(x[i]),
                    ema=float(prev[i]),
                    ratio=float(r[i]),
                )
            )
        self._m = np.where(
            finite, self.beta * self._m + (1.0 - self.beta) * np.nan_to_num(x), self._m
        )
        self._t = self._t + finite
        return events

    def reset(self, mask: np.ndarray) -> None:
        """Forget the streams in ``mask`` (a restarted env's fresh host has its own scale)."""
        if self._m is not None and self._t is not None:
            self._m = np.where(mask, 0.0, self._m)
            self._t = np.where(mask, 0.0, self._t)


class PerformanceDegradationDetector:
    """Accuracy dropping from its best by more than ``drop`` after ``warmup_epochs`` (per env).

    A drop of more than twice ``drop`` is severe.
    """

    def __init__(self, warmup_epochs: int = 5, drop: float = 0.05) -> None:
        self.warmup_epochs, self.drop = warmup_epochs, drop
        self.best: np.ndarray | None = None
        self._seen: np.ndarray | None = None

    def reset(self, mask: np.ndarray) -> None:
        """Restart warm-up and best-so-far for the envs in ``mask`` (new episodes)."""
        if self.best is not None and self._seen is not None:
            self.best = np.where(mask, -np.inf, self.best)
            self._seen = np.where(mask, 0, self._seen)

    def update(self, accuracy: float | np.ndarray, epoch: int) -> list[AnomalyEvent]:
        acc, scalar = _as_envs(accuracy)
        if self.best is None or self._seen is None or self.best.shape != acc.shape:
            self.best, self._seen = np.full_like(acc, -np.inf), np.zeros(acc.shape, dtype=np.int64)
        self._seen = self._seen + 1
        events = []
        fall = np.where(self._seen > self.warmup_epochs, self.best - acc, np.nan)
        for i in np.flatnonzero(np.isfinite(fall) & (fall > self.drop)):
            sev = SEVERE if fall[i] > 2 * self.drop else WARNING
            events.append(
                _event(
                    "performance_degradation",
                    sev,
                    f"accuracy {acc[i]:.4f} is {fall[i]:.4f} below its best {self.best[i]:.4f}",
                    -1 if scalar else int(i),
                    epoch,
                    accuracy=float(acc[i]),
                    best=float(self.best[i]),
                )
            )
        self.best = np.fmax(self.best, acc)
        return events


class ValueCollapseDetector:
    """Explained variance below ``threshold`` for ``patience`` consecutive PPO updates (severe)."""

    def __init__(self, threshold: float = 0.1, patience: int = 5) -> None:
        self.threshold, self.patience = threshold, patience
        self.streak = 0

    def update(self, explained_variance: float, step: int) -> list[AnomalyEvent]:
        ev = float(explained_variance)
        self.streak = self.streak + 1 if not ev >= self.threshold else 0
        if self.streak == self.patience:
            return [
                _event(
                    "value_collapse",
                    SEVERE,
                    f"explained variance below {self.threshold} for {self.patience} updates ({ev:.3f})",
                    -1,
                    step,
                    explained_variance=ev,
                )
            ]
        return []


def check_ratio_explosion(
    ratio_max: float, ratio_min: float, step: int, *, max_bound: float = 5.0, min_bound: float = 0.2
) -> list[AnomalyEvent]:
    """PPO probability ratio outside ``[min_bound, max_bound]`` (severe if non-finite)."""
    hi, lo = float(ratio_max), float(ratio_min)
    if not (np.isfinite(hi) and np.isfinite(lo)):
        return [
            _event(
                "ratio_explosion",
                SEVERE,
                "non-finite PPO ratio",
                -1,
                step,
                ratio_max=None,
                ratio_min=None,
            )
        ]
    if hi > max_bound or lo < min_bound:
        return [
            _event(
                "ratio_explosion",
                WARNING,
                f"PPO ratio range [{lo:.3g}, {hi:.3g}] outside [{min_bound}, {max_bound}]",
                -1,
                step,
                ratio_max=hi,
                ratio_min=lo,
            )
        ]
    return []


@torch.no_grad()
def lstm_hidden_stats(
    h: torch.Tensor, c: torch.Tensor | None = None, env_dim: int = 1
) -> TensorDict:
    """On-device LSTM state health per env: h_norm, c_norm (if given), nonfinite count ([N]).

    ``h``/``c`` are [layers, N, H] (``env_dim=1``, torch's layout) or [N, H] (``env_dim=0``).
    """

    def per_env(x: torch.Tensor) -> torch.Tensor:
        return x.detach().movedim(env_dim, 0).flatten(1).float()

    hf = per_env(h)
    out = {"h_norm": torch.linalg.vector_norm(torch.nan_to_num(hf), dim=1)}
    bad = (~torch.isfinite(hf)).sum(dim=1)
    if c is not None:
        cf = per_env(c)
        out["c_norm"] = torch.linalg.vector_norm(torch.nan_to_num(cf), dim=1)
        bad = bad + (~torch.isfinite(cf)).sum(dim=1)
    out["nonfinite"] = bad
    return TensorDict(out, batch_size=[hf.shape[0]])


def check_lstm_health(
    h_norm: float | np.ndarray,
    step: int,
    *,
    c_norm: float | np.ndarray | None = None,
    nonfinite: float | np.ndarray | None = None,
    max_norm: float = 100.0,
    min_norm: float = 1e-4,
) -> list[AnomalyEvent]:
    """LSTM hidden state too large / too small (warning) or containing NaN/Inf (severe)."""
    h, scalar = _as_envs(h_norm)
    events: list[AnomalyEvent] = []
    bad = _as_envs(nonfinite)[0] if nonfinite is not None else np.zeros_like(h)
    norms = {"h": h} | ({"c": _as_envs(c_norm)[0]} if c_norm is not None else {})
    for i in range(h.shape[0]):
        env = -1 if scalar else i
        if bad[i] > 0 or not np.isfinite(h[i]):
            events.append(_event("lstm_health", SEVERE, "non-finite LSTM state", env, step))
            continue
        for name, arr in norms.items():
            if arr[i] > max_norm:
                events.append(
                    _event(
                        "lstm_health",
                        WARNING,
                        f"LSTM {name} norm {arr[i]:.3g} > {max_norm}",
                        env,
                        step,
                        norm=float(arr[i]),
                    )
                )
            elif name == "h" and arr[i] < min_norm:
                events.append(
                    _event(
                        "lstm_health",
                        WARNING,
                        f"LSTM h norm {arr[i]:.3g} < {min_norm}",
                        env,
                        step,
                        norm=float(arr[i]),
                    )
                )
    return events


# Keys read by AnomalyMonitor (materialized epoch snapshot / PPO update stats).
GRAD_NORM_KEY = "gradients.total_norm"
ACCURACY_KEY = "metrics.val_accuracy"


class AnomalyMonitor:
    """All detectors behind two calls: ``check_epoch`` (host training) and ``check_ppo_update``.

    PPO update keys (any subset): explained_variance, ratio_max & ratio_min, grad_norm,
    lstm_h_norm, lstm_c_norm, lstm_nonfinite.
    """

    def __init__(
        self,
        *,
        drift: GradientDriftDetector | None = None,
        degradation: PerformanceDegradationDetector | None = None,
        value_collapse: ValueCollapseDetector | None = None,
        policy_drift: GradientDriftDetector | None = None,
        ratio_bounds: tuple[float, float] = (0.2, 5.0),
        lstm_norm_bounds: tuple[float, float] = (1e-4, 100.0),
    ) -> None:
        self.drift = drift or GradientDriftDetector()
        self.degradation = degradation or PerformanceDegradationDetector()
        self.value_collapse = value_collapse or ValueCollapseDetector()
        self.policy_drift = policy_drift or GradientDriftDetector()
        self.ratio_bounds = ratio_bounds
        self.lstm_norm_bounds = lstm_norm_bounds

    def reset_envs(self, mask: np.ndarray) -> None:
        """Per-env detector state starts over for envs whose episode restarted."""
        self.drift.reset(mask)
        self.degradation.reset(mask)

    def check_epoch(self, snapshot: Mapping[str, np.ndarray], epoch: int) -> list[AnomalyEvent]:
        events = []
        if GRAD_NORM_KEY in snapshot:
            events += self.drift.update(snapshot[GRAD_NORM_KEY], epoch)
        if ACCURACY_KEY in snapshot:
            events += self.degradation.update(snapshot[ACCURACY_KEY], epoch)
        return events

    def check_ppo_update(self, stats: Mapping[str, float], step: int) -> list[AnomalyEvent]:
        """Policy-level checks of one PPO update: events have no env (-1), ``epoch`` is the
        update ``step`` and ``payload["scope"]`` is ``"ppo_update"``."""
        events = self._check_ppo_update(stats, step)
        for e in events:
            e.payload["scope"] = PPO_SCOPE
        return events

    def _check_ppo_update(self, stats: Mapping[str, float], step: int) -> list[AnomalyEvent]:
        events = []
        if "explained_variance" in stats:
            events += self.value_collapse.update(stats["explained_variance"], step)
        if "ratio_max" in stats and "ratio_min" in stats:
            lo, hi = self.ratio_bounds
            events += check_ratio_explosion(
                stats["ratio_max"], stats["ratio_min"], step, max_bound=hi, min_bound=lo
            )
        if "grad_norm" in stats:
            events += self.policy_drift.update(stats["grad_norm"], step)
        if "lstm_h_norm" in stats:
            lo, hi = self.lstm_norm_bounds
            events += check_lstm_health(
                stats["lstm_h_norm"],
                step,
                c_norm=stats.get("lstm_c_norm"),
                nonfinite=stats.get("lstm_nonfinite"),
                max_norm=hi,
                min_norm=lo,
            )
        return events


class EscalationState:
    """Picks the active TelemetryConfig per epoch; severe anomalies escalate for a while.

    It keeps its own clock, the number of epochs observed (``observe`` is called once per
    epoch, with or without events), so a caller's epoch numbering (per-episode epochs that
    restart, or a global step) cannot disagree with it. An escalating event observed after
    an epoch makes the next ``escalation_epochs`` epochs use the base profile's
    ``escalate_to`` profile (no-op when that is null).
    """

    def __init__(
        self, base: TelemetryConfig, loader: Callable[[str], TelemetryConfig] = load_profile
    ) -> None:
        self.base = base
        self.escalated: TelemetryConfig | None = (
            loader(base.escalate_to) if base.escalate_to else None
        )
        self.observed = 0  # epochs observed so far = index of the next epoch
        self.until = -1  # last epoch index (own clock) that runs escalated
        self.reasons: list[str] = []
        self.since_epoch: int | None = None  # the caller's epoch label of the last escalation

    def observe(self, events: Iterable[AnomalyEvent], epoch: int | None = None) -> bool:
        """Close one epoch: escalate on any event whose payload asks for it.

        ``epoch`` is the caller's label for it, kept for the record only. Returns whether it
        escalated now.
        """
        self.observed += 1
        asked = [e for e in events if e.payload.get("escalate")]
        if not asked or self.escalated is None:
            return False
        self.until = max(self.until, self.observed + self.base.escalation_epochs - 1)
        self.reasons = [f"{e.detector}: {e.message}" for e in asked]
        self.since_epoch = epoch
        return True

    def is_escalated(self) -> bool:
        """Whether the next epoch runs the escalated profile."""
        return self.escalated is not None and self.observed <= self.until

    @property
    def epochs_left(self) -> int:
        """Epochs, the next one included, still to run escalated."""
        return max(0, self.until - self.observed + 1) if self.escalated is not None else 0

    def config_for_next(self) -> TelemetryConfig:
        """The profile for the next epoch (the one after the last ``observe``)."""
        if self.is_escalated() and self.escalated is not None:
            return self.escalated
        return self.base
