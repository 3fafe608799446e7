"""Rule-based Tamiyo: one vectorized decision per env per epoch, with a reason code each.

Reads the env's TensorDict (``signals``, ``tracker`` and the four masks) and writes the
action keys ``op, slot, blueprint, tempo`` plus ``reason`` (a ``leyline.Reason`` code, an
index into ``leyline.REASONS``).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from esper.leyline import (
    ISOLATED_STAGES,
    LIVE_STAGES,
    MEASURED_STAGES,
    PRESENT_STAGES,
    Op,
    Reason,
    SeedStage,
    stage_mask,
)
from esper.leyline import REASONS as REASONS  # defined in leyline; re-exported for older imports
from esper.tamiyo.config import HeuristicConfig

S = SeedStage




# Default order the heuristic tries blueprints in: capacity first (conv_light was the reference
# system's best performer; on the embedded task residual convs keep paying: a one-block host
# trained from scratch gains 14 points with one and 18 with three), then the cheaper ones.
# Transformer hosts (their own blueprint family): a whole block first (depth is what a one-block
# host lacks), then the MLP, a head, LoRA.
DEFAULT_ROTATION: tuple[str, ...] = (
    "conv_light", "conv_heavy", "depthwise", "bottleneck", "attention", "conv_small", "norm",
    "block", "mlp", "head", "lora",
)


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 where none is True)."""
    return mask.long().argmax(dim=-1)


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True along the last dim (0 where none is True)."""
    k = mask.shape[-1]
    return (k - 1 - mask.flip(-1).long().argmax(dim=-1)) * mask.any(dim=-1)


def preferred_slot(mask: torch.Tensor, preference: str) -> torch.Tensor:
    """The free slot to grow into: the deepest (widest) or the shallowest legal one."""
    return last_true(mask) if preference == "deepest" else first_true(mask)


def fresh_hosts(td: TensorDictBase) -> torch.Tensor:
    """``[N]`` True for envs whose host has not trained yet (a new episode starts at this call).

    Stateful policies restart their per-env state from this, so any driver (torchrl's
    collector included) resets them without telling them: no ``reset`` call to forget.
    """
    return td["signals", "epoch"] == 0


def pick(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``mask[n, index[n]]`` for a ``[N, K]`` tensor."""
    return mask.gather(1, index.unsqueeze(1)).squeeze(1)


class HeuristicPolicy:
    """The reference heuristic, acting on all envs at once (per-env state is tensors)."""

    def __init__(
        self,
        cfg: HeuristicConfig,
        blueprints: tuple[str, ...],
        n_envs: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.blueprints = blueprints
        self.n = n_envs
        self.device = torch.device(device)
        if cfg.blueprints is not None:
            names = tuple(cfg.blueprints)
        else:  # capacity first, then the cheap ones; anything else Kasmina has goes last
            names = tuple(b for b in DEFAULT_ROTATION if b in blueprints)
            names += tuple(b for b in blueprints if b not in names and b != "noop")
        unknown = [b for b in names if b not in blueprints]
        if unknown or not names:
            raise ValueError(f"heuristic blueprints {unknown} not among Kasmina's {list(blueprints)}")
        self.allowed = torch.tensor([b in names for b in blueprints], device=self.device)
        # Rotation order: position of each Kasmina blueprint in ``names`` (the order tried).
        order = {b: i for i, b in enumerate(names)}
        self.rank = torch.tensor([order.get(b, len(names)) for b in blueprints], device=self.device)
        self.live = stage_mask(LIVE_STAGES, self.device)
        self.present = stage_mask(PRESENT_STAGES, self.device)
        self.measured = stage_mask(MEASURED_STAGES, self.device)
        blocking = {
            "live": LIVE_STAGES,
            "isolated": ISOLATED_STAGES,
            "nothing": frozenset(),
        }[cfg.wait_for]
        self.blocking = stage_mask(blocking, self.device)
        self.penalty = torch.zeros(n_envs, len(blueprints), device=self.device)
        self.pointer = torch.zeros(n_envs, dtype=torch.long, device=self.device)
        self.acc_ref: torch.Tensor | None = None

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Forget per-env rotation state and penalties for envs in ``mask`` (all if None)."""
        if mask is None:
            mask = torch.ones(self.n, dtype=torch.bool, device=self.device)
        self.penalty = torch.where(mask[:, None], torch.zeros_like(self.penalty), self.penalty)
        self.pointer = torch.where(mask, torch.zeros_like(self.pointer), self.pointer)
        if self.acc_ref is not None:
            self.acc_ref = torch.where(mask[:, None], torch.zeros_like(self.acc_ref), self.acc_ref)

    def choose_blueprint(self, legal: torch.Tensor) -> torch.Tensor:
        """Rotate through allowed blueprints, skipping recently culled ones (lowest penalty)."""
        b = self.penalty.shape[1]
        rotation = torch.remainder(self.rank[None, :] - self.pointer[:, None], b).float()
        score = self.penalty + 1e-3 * rotation
        ok = legal & self.allowed[None, :]
        return torch.where(ok, score, torch.full_like(score, float("inf"))).argmin(dim=1)

    def plateaued(self, val_acc_hist: torch.Tensor) -> torch.Tensor:
        """Mean val-acc gain per epoch over the last ``plateau_epochs`` below ``plateau_delta``.

        A window, not consecutive flat epochs: epoch-to-epoch validation noise (a point or two
        on a small validation set) otherwise keeps resetting the count while a small host is
        still creeping up far below what a grown one reaches.
        """
        w = self.cfg.plateau_epochs
        if w >= val_acc_hist.shape[1]:
            raise ValueError(
                f"heuristic plateau_epochs ({w}) needs a val-acc history longer than {w}, "
                f"got {val_acc_hist.shape[1]} (raise history_length)"
            )
        rate = (val_acc_hist[:, -1] - val_acc_hist[:, -1 - w]) / w
        return rate < self.cfg.plateau_delta

    def _observe(self, sig: TensorDictBase, tracker: TensorDictBase) -> None:
        """Update penalties and reference accuracies from the last epoch's outcome."""
        stage, before = sig["stage"], sig["stage_before"]
        # A cull moves CULLED -> EMBARGOED within its epoch: count arrivals in EMBARGOED.
        culled = (stage == S.EMBARGOED) & (before != S.EMBARGOED)  # [N, S]
        hit = torch.zeros_like(self.penalty).scatter_add_(1, sig["blueprint"], culled.float())
        self.penalty = self.penalty * self.cfg.penalty_decay + self.cfg.cull_penalty * hit
        if self.acc_ref is None or self.acc_ref.shape != stage.shape:
            self.acc_ref = torch.zeros(stage.shape, device=self.device)
        self.acc_ref = torch.where(sig["germinated"], tracker["prev_val_acc"][:, None], self.acc_ref)

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        cfg = self.cfg
        sig, tracker = td["signals"], td["tracker"]
        self.reset(fresh_hosts(td))
        self._observe(sig, tracker)
        stage, eis = sig["stage"], sig["epochs_in_stage"]
        contribution = sig["contribution"]
        measured = self.measured[stage]
        slot_mask = td["slot_mask"]
        live = self.live[stage]
        n = stage.shape[0]
        dev = stage.device

        # 1. The last gate: fossilize contributing seeds, cull the rest after some patience.
        probation = stage == S.PROBATIONARY
        foss_ok = slot_mask[:, Op.FOSSILIZE] & (contribution > cfg.fossilize_threshold)
        weak = probation & ~foss_ok & (eis >= cfg.probation_patience)
        # 2. Accuracy drop (or clearly harmful measured contribution) after some epochs in stage.
        drop = (self.acc_ref - sig["val_acc"][:, None]) > cfg.drop_threshold
        harmful = measured & (contribution < -cfg.drop_threshold)
        drop_cull = live & (eis >= cfg.min_epochs_before_cull) & (drop | harmful)
        # 3. Advance seeds whose gate passed.
        advance = slot_mask[:, Op.ADVANCE]
        # 4. Germinate on a plateau with no live seed (or, with ``wait_for="isolated"``, none
        # still in isolated training).
        epoch = sig["epoch"]
        busy = self.blocking[stage].any(dim=1)
        n_seeds = self.present[stage].sum(dim=1)
        warm = epoch >= cfg.warmup_epochs
        plateau = self.plateaued(tracker["val_acc_hist"]) & (epoch > cfg.plateau_epochs)
        cooled = tracker["epochs_since_cull"] >= cfg.cull_cooldown
        free = slot_mask[:, Op.GERMINATE]
        room = n_seeds < cfg.max_seeds
        bp_legal = td["blueprint_mask"] & self.allowed[None, :]
        germ = warm & ~busy & plateau & cooled & free.any(1) & room & bp_legal.any(1)

        op = torch.full((n,), int(Op.WAIT), dtype=torch.long, device=dev)
        slot = torch.zeros(n, dtype=torch.long, device=dev)
        reason = torch.full((n,), int(Reason.WAIT_WARMUP), dtype=torch.long, device=dev)
        reason = torch.where(warm & busy, int(Reason.WAIT_SEED_LIVE), reason)
        reason = torch.where(warm & ~busy & ~plateau, int(Reason.WAIT_NO_PLATEAU), reason)
        reason = torch.where(warm & ~busy & plateau & ~cooled, int(Reason.WAIT_COOLDOWN), reason)
        reason = torch.where(warm & ~busy & plateau & cooled & ~free.any(1), int(Reason.WAIT_NO_SLOT), reason)
        reason = torch.where(warm & ~busy & plateau & cooled & free.any(1) & ~room, int(Reason.WAIT_MAX_SEEDS), reason)

        # Lowest priority first; later assignments win.
        choices = (
            (germ, preferred_slot(free, cfg.slot_preference), Op.GERMINATE, Reason.GERMINATE_PLATEAU),
            (advance.any(1), first_true(advance), Op.ADVANCE, Reason.ADVANCE_GATE_PASSED),
            (drop_cull.any(1), first_true(drop_cull), Op.CULL, Reason.CULL_ACC_DROP),
            (weak.any(1), first_true(weak), Op.CULL, Reason.CULL_LOW_CONTRIBUTION),
            (foss_ok.any(1), first_true(foss_ok), Op.FOSSILIZE, Reason.FOSSILIZE_CONTRIBUTION),
        )
        for when, where, o, r in choices:
            op = torch.where(when, int(o), op)
            slot = torch.where(when, where, slot)
            reason = torch.where(when, int(r), reason)
        # A cull must be legal (live); drop/weak masks are subsets of live, so this holds.
        blueprint = self.choose_blueprint(bp_legal)
        self.pointer = torch.where(op == Op.GERMINATE, self.rank[blueprint] + 1, self.pointer)
        tempo = torch.full((n,), cfg.tempo_index, dtype=torch.long, device=dev)
        td.set("op", op)
        td.set("slot", slot)
        td.set("blueprint", blueprint)
        td.set("tempo", tempo)
        td.set("reason", reason)
        return td
