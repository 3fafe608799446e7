"""Validation (with per-slot counterfactuals) and test scoring of
:class:`~esper.kasmina.epoch.MorphogeneticBatch`: a mixin reading the batch's state and plans."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from esper.kasmina.model import Architecture, Plans, forward_eval
from esper.kasmina.state import as_dicts


def score_val_batch(
    arch: Architecture, params: dict, buffers: dict, seeds: dict, ctrl: dict, x: torch.Tensor,
    y: torch.Tensor, plans: Plans | None, num_classes: int, loss_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One validation batch: correct targets per row ``[1 + S, N]`` (row 0 the actual model,
    row ``1 + k`` without slot ``k``'s seed), the summed loss of the first ``loss_rows`` rows
    ``[loss_rows, N]`` (1: the actual model; ``1 + S`` when contribution is loss-based) and the
    actual model's logits ``[N, targets, K]``. One function, so a compiled run compiles it as
    one graph."""
    logits = forward_eval(arch, params, buffers, seeds, ctrl, x, plans)
    correct = (logits.argmax(dim=-1) == y).flatten(2).sum(dim=-1)
    n = logits.shape[1]
    scored = logits[:loss_rows]
    loss = F.cross_entropy(scored.reshape(-1, num_classes), y.reshape(-1).repeat(loss_rows * n),
                           reduction="none").view(loss_rows, n, -1).sum(-1)
    return correct, loss, logits[0].reshape(n, -1, num_classes)


class Scoring:
    """The validation pass (counterfactual rows included) and the held-out test pass."""

    @torch.no_grad()
    def validate(self, keep_logits: bool = False) -> dict[str, torch.Tensor]:
        """Loss, accuracy and per-slot counterfactual accuracy, per env.

        With ``keep_logits`` the actual model's validation logits ``[N, V, K]`` are returned as
        ``val_logits`` (per-class telemetry reads them with ``task.val_y``; for sequences ``V``
        counts tokens and the labels are ``task.val_y`` flattened). Accuracy and loss are per
        target: per image, or per token (next-token accuracy, mean cross-entropy).
        """
        st = as_dicts(self.state)
        ctrl = self.controls()
        correct = torch.zeros(1 + len(self.arch.slots), self.n, device=self.device)
        # Counterfactual rows' losses only where the contribution reads them.
        loss_rows = 1 + len(self.arch.slots) if self.cfg.contribution == "loss" else 1
        loss = torch.zeros(loss_rows, self.n, device=self.device)
        kept: list[torch.Tensor] = []
        # Compiled, the training step's plan (every group present, sizes dynamic: one graph);
        # eager, the exact groups.
        plans = (self._plans if self._plans is not None else self._group_plan(None)) if self.cfg.compile \
            else self._eval_plans
        for x, y in self.sampler.val_batches(self.cfg.val_batch_size):
            graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
            c, l_sum, actual = self._score_val(self.arch, st["host"], st["buffers"], st["seeds"], ctrl, x, y,
                                               plans, self.num_classes, loss_rows)
            if counters["stats"]["unique_graphs"] != graphs:
                self.compile_graphs += counters["stats"]["unique_graphs"] - graphs
                self.compile_seconds += time.perf_counter() - t0
            correct += c
            loss += l_sum
            if keep_logits:
                kept.append(actual)
        total = self.task.val_y.numel()  # images, or tokens
        acc = 100.0 * correct / total
        out = {
            "val_loss": loss[0] / total,
            "val_acc": acc[0],
            "val_acc_without": acc[1:].T.contiguous(),  # [N, S]
        }
        if loss_rows > 1:
            out["val_loss_without"] = (loss[1:] / total).T.contiguous()  # [N, S]
        if keep_logits:
            out["val_logits"] = torch.cat(kept, dim=1)
        return out

    @torch.no_grad()
    def test(self) -> dict[str, torch.Tensor]:
        """Loss and accuracy ``[N]`` of every env's current model on the held-out test split.

        No counterfactuals: only reported scores read this, never a decision, so it runs when
        an episode ends (``run_epoch(test=True)``; the caller knows when from its snapshot).
        """
        st = as_dicts(self.state)
        ctrl = self.controls()
        k_cls = self.num_classes
        correct = torch.zeros(self.n, device=self.device)
        loss = torch.zeros(self.n, device=self.device)
        for x, y in self.sampler.val_batches(self.cfg.val_batch_size, split="test"):
            logits = forward_eval(self.arch, st["host"], st["buffers"], st["seeds"], ctrl, x,
                                  self._eval_plans, counterfactuals=False)[0]
            correct += (logits.argmax(dim=-1) == y).reshape(self.n, -1).sum(dim=-1)
            loss += F.cross_entropy(logits.reshape(-1, k_cls), y.reshape(-1).repeat(self.n),
                                    reduction="none").view(self.n, -1).sum(1)
        total = self.task.test_y.numel()
        return {"test_loss": loss / total, "test_acc": 100.0 * correct / total}
