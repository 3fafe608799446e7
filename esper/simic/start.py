"""Where a fresh PPO run starts: the shipped controller when it fits, else random weights.

Starting from the shipped controller (trained over a mix of tasks and hosts,
``bench/train_controller_mix.sh``) makes the main command fine-tune a controller that already
grows hosts well instead of spending its few default rounds learning from nothing;
``--from-scratch`` opts out. A config whose network widths or layout differ from the shipped
controller's starts from scratch, and the run says why.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esper.simic.checkpoint import CheckpointError, load_checkpoint, shipped_controller
from esper.simic.config import TrainingConfig
from esper.simic.errors import UsageError

WIDTHS = ("hidden_size", "lstm_hidden_size")  # policy-shape fields set by the config alone


def shipped_start(cfg: TrainingConfig) -> tuple[Path | None, str]:
    """The shipped controller's path when its widths match ``cfg`` (None otherwise), and the
    sentence the run prints about where it starts."""
    path = shipped_controller()
    if path is None:
        return None, "starting from scratch: this install ships no controller"
    try:
        shape = load_checkpoint(path)["policy_shape"]
    except CheckpointError as err:
        return None, f"starting from scratch: the shipped controller is unusable ({err})"
    saved = {k: shape.get(k) for k in WIDTHS}
    now = {k: getattr(cfg.ppo, k) for k in WIDTHS}
    if saved != now:
        return None, (f"starting from scratch: the shipped controller's widths {saved} differ from this config's {now} "
                      "(set ppo.hidden_size and ppo.lstm_hidden_size to start from it)")
    return path, f"starting from the shipped controller {path} (--from-scratch: random weights)"


def check_start_flags(args: argparse.Namespace, cfg: TrainingConfig) -> TrainingConfig:
    """``--heldout`` and ``--from-scratch``, checked before any work; ``cfg`` with the host count."""
    if args.heldout is not None and args.mix is not None:
        raise UsageError("--heldout with --mix", "--heldout", "a run of one setting (a mix has no held-out check)")
    if args.heldout is not None:
        if args.heldout < 0:
            raise UsageError(f"--heldout {args.heldout}", "--heldout", "a number of hosts, 0 or more (0: no check)")
        cfg = cfg.updated(ppo={"heldout_hosts": args.heldout})
    if args.from_scratch and (args.init is not None or args.resume is not None or args.mix is not None):
        flag = "--init" if args.init is not None else "--resume" if args.resume is not None else "--mix"
        raise UsageError(f"--from-scratch with {flag}", "--from-scratch",
                         "one start: --from-scratch (random weights), --init CKPT or --resume CKPT")
    return cfg
