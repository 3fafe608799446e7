"""The signal schema: what one epoch of the batched hosts emits, per env.

``SIGNAL_KEYS`` are what controllers, gates and rewards may read (train and validation
measurements, lifecycle state). ``SCORE_KEYS`` are held-out test measurements: they ride in the
epoch's telemetry snapshot and episode summaries, and are never part of what a controller sees.
"""

from __future__ import annotations

import torch

# name -> (per-env trailing shape kind, dtype); kinds: "env" [N], "slot" [N, S], "gate" [N, S, G].
SIGNAL_KEYS: dict[str, tuple[str, torch.dtype]] = {
    "train_loss": ("env", torch.float32),
    "train_acc": ("env", torch.float32),
    "val_loss": ("env", torch.float32),
    "val_acc": ("env", torch.float32),
    "host_grad_norm": ("env", torch.float32),
    "params_added": ("env", torch.float32),
    "flops_added": ("env", torch.float32),
    "action_accepted": ("env", torch.bool),
    "epoch": ("env", torch.long),
    "seed_grad_norm": ("slot", torch.float32),
    "val_acc_without": ("slot", torch.float32),
    "contribution": ("slot", torch.float32),
    "alpha": ("slot", torch.float32),
    "germinated": ("slot", torch.bool),
    "embargoed": ("slot", torch.bool),
    "stage_before": ("slot", torch.long),
    "stage": ("slot", torch.long),
    "blueprint": ("slot", torch.long),
    "epochs_in_stage": ("slot", torch.long),
    "seed_age": ("slot", torch.long),
    "gate_pass": ("gate", torch.bool),
    "gate_reason": ("gate", torch.long),
}

# Held-out scores, present in an epoch's signals only when an episode ends there.
SCORE_KEYS: tuple[str, ...] = ("test_acc", "test_loss")
