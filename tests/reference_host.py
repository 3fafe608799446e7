"""One env as plain ``nn.Module``s: the loop-over-hosts baseline for the batched engine.

``ReferenceHost.from_batch(batch, i)`` copies env ``i``'s host (and the active seed of every
live slot) out of :class:`~esper.kasmina.epoch.MorphogeneticBatch`'s state into ordinary
``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` layers, with the same slot semantics
(straight-through while isolated, ``h + alpha * (s - h)`` while blended). Training it with
``torch.optim.SGD(nesterov=True)`` and per-env gradient clipping reproduces the batched step
for that env (see ``tests/test_reference_equivalence.py``); a Python loop over N of them is
what the batched engine replaces (``bench/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina.blueprints import Blueprint
from esper.kasmina.step import StepHyper
from esper.leyline import PRESENT_STAGES


class SeedModule(nn.Module):
    """One blueprint's seed for one env: ``s = x + delta(x)`` with its own parameters."""

    def __init__(self, blueprint: Blueprint, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.blueprint = blueprint
        # Parameters keep the engine's leading env dim of size 1, so ``delta`` runs with n=1.
        self.weights = nn.ParameterDict(
            {k: nn.Parameter(v.detach().clone().unsqueeze(0)) for k, v in params.items()}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blueprint.identity:
            return x
        return x + self.blueprint.delta(dict(self.weights.items()), x, 1)


@dataclass
class SlotControl:
    """A slot's per-env control values, read once from the batch (Python scalars here)."""

    alpha: float
    isolated: bool
    lr: float


class ReferenceHost(nn.Module):
    """conv3x3-BN-ReLU(-maxpool) blocks, seed slots, global average pool, linear head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...],
        slot_after: dict[str, int],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.blocks.append(
                nn.ModuleDict(
                    {"conv": nn.Conv2d(cin, w, 3, padding=1, bias=False), "bn": nn.BatchNorm2d(w)}
                )
            )
            cin = w
        self.head = nn.Linear(cin, num_classes)
        self.slot_after = dict(slot_after)
        self.seeds = nn.ModuleDict()
        self.controls: dict[str, SlotControl] = {}
        self.momentum: dict[str, torch.Tensor] = {}  # parameter name -> copied SGD buffer

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_batch(cls, batch: object, env: int) -> ReferenceHost:
        """Copy env ``env`` of a ``MorphogeneticBatch`` (host, BN buffers, live/fossilized seeds)."""
        from esper.leyline import CANONICAL_SLOTS

        arch = batch.arch  # type: ignore[attr-defined]
        state = batch.state  # type: ignore[attr-defined]
        spec = arch.spec
        slot_after = {s: spec.slot_after[CANONICAL_SLOTS.index(s)] for s in arch.slots}
        model = cls(batch.in_channels, batch.num_classes, spec.widths, slot_after)  # type: ignore[attr-defined]
        with torch.no_grad():
            for i, block in enumerate(model.blocks):
                block["conv"].weight.copy_(state["host", f"block{i}.conv"][env])
                block["bn"].weight.copy_(state["host", f"block{i}.bn_w"][env])
                block["bn"].bias.copy_(state["host", f"block{i}.bn_b"][env])
                block["bn"].running_mean.copy_(state["buffers", f"block{i}.bn_mean"][env])
                block["bn"].running_var.copy_(state["buffers", f"block{i}.bn_var"][env])
            model.head.weight.copy_(state["host", "head.w"][env])
            model.head.bias.copy_(state["host", "head.b"][env])
        for i in range(len(spec.widths)):
            for ours, theirs in (
                ("conv.weight", "conv"),
                ("bn.weight", "bn_w"),
                ("bn.bias", "bn_b"),
            ):
                model.momentum[f"blocks.{i}.{ours}"] = state["host_mom", f"block{i}.{theirs}"][
                    env
                ].clone()
        model.momentum["head.weight"] = state["host_mom", "head.w"][env].clone()
        model.momentum["head.bias"] = state["host_mom", "head.b"][env].clone()
        ctrl = batch.controls()  # type: ignore[attr-defined]
        for slot in arch.slots:
            stage = int(state["slots", slot, "stage"][env])
            if stage not in PRESENT_STAGES:
                continue
            bp = arch.blueprints[int(state["slots", slot, "blueprint"][env])]
            params = {k: v[env] for k, v in state["seeds", slot, bp.name].items()}
            model.seeds[slot] = SeedModule(bp, params)
            for k, v in state["seed_mom", slot, bp.name].items():
                model.momentum[f"seeds.{slot}.weights.{k}"] = v[env].unsqueeze(0).clone()
            model.controls[slot] = SlotControl(
                alpha=float(ctrl[slot]["alpha"][env]),
                isolated=bool(ctrl[slot]["isolated"][env] > 0),
                lr=float(ctrl[slot]["lr"][env]),
            )
        return model

    # ------------------------------------------------------------------ forward
    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        block = self.blocks[i]
        h = F.relu(block["bn"](block["conv"](h)))
        return F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 4 else h

    def _slot(self, slot: str, h: torch.Tensor) -> torch.Tensor:
        if slot not in self.seeds:
            return h
        ctrl = self.controls[slot]
        if ctrl.isolated:  # the seed learns from the loss; the output (and host grad) is the host's
            s = self.seeds[slot](h.detach())
            return h + (s - s.detach())
        s = self.seeds[slot](h)
        return h + ctrl.alpha * (s - h)

    def _slots_after(self, i: int) -> Iterator[str]:
        return (s for s, b in self.slot_after.items() if b == i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(len(self.blocks)):
            h = self._block(i, h)
            for slot in self._slots_after(i):
                h = self._slot(slot, h)
        return self.head(h.mean(dim=(2, 3)))

    def forward_counterfactual(self, x: torch.Tensor) -> torch.Tensor:
        """Eval logits ``[1 + S, B, K]``: actual, then each slot's seed removed (alpha 0).

        Like the batched engine, each counterfactual branches off where its slot is reached.
        """
        b = x.shape[0]
        h = x
        for i in range(len(self.blocks)):
            h = self._block(i, h)
            for slot in self._slots_after(i):
                h = torch.cat([self._slot(slot, h), h[:b]], dim=0)
        logits = self.head(h.mean(dim=(2, 3)))
        return logits.view(-1, b, logits.shape[-1])

    # ------------------------------------------------------------------ training
    def host_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("seeds.")]

    def make_optimizers(self, hp: StepHyper) -> list[tuple[torch.optim.SGD, list[nn.Parameter]]]:
        """One Nesterov SGD per clipping group: the host, then each seed (its own lr).

        Momentum buffers copied from the batch (:meth:`from_batch`) are loaded, so a step
        continues the batched optimizer's state exactly.
        """
        groups = [(hp.host_lr, self.host_parameters())]
        groups += [(self.controls[s].lr, list(m.parameters())) for s, m in self.seeds.items()]
        names = {id(p): n for n, p in self.named_parameters()}
        out = []
        for lr, ps in groups:
            if not ps:
                continue
            opt = torch.optim.SGD(
                ps, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True
            )
            for p in ps:
                buf = self.momentum.get(names[id(p)])
                if buf is not None:
                    opt.state[p]["momentum_buffer"] = buf.clone()
            out.append((opt, ps))
        return out

    def train_step(
        self,
        optimizers: list[tuple[torch.optim.SGD, list[nn.Parameter]]],
        x: torch.Tensor,
        y: torch.Tensor,
        max_grad_norm: float,
    ) -> torch.Tensor:
        """Forward, backward, clip each group to ``max_grad_norm``, step. Returns the loss."""
        self.train()
        for opt, _ in optimizers:
            opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self(x), y)
        loss.backward()
        for opt, params in optimizers:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
        return loss.detach()

    @torch.no_grad()
    def validate(
        self, x: torch.Tensor, y: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss of the actual model and correct counts per counterfactual row ``[1 + S]``."""
        self.eval()
        loss = torch.zeros((), device=x.device)
        correct = torch.zeros(1 + len(self.slot_after), device=x.device)
        for start in range(0, x.shape[0], chunk):
            xb, yb = x[start : start + chunk], y[start : start + chunk]
            logits = self.forward_counterfactual(xb)
            loss += F.cross_entropy(logits[0], yb, reduction="sum")
            correct += (logits.argmax(dim=-1) == yb).sum(dim=-1)
        return loss, correct
