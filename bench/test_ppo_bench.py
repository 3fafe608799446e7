"""One PPO update (``PPOTrainer.update``: ``ppo.epochs`` passes of ClipPPOLoss + Adam over
minibatches of whole env sequences) on a collected batch (eager loss).

The batch is collected once (a tiny task, 8 envs x 6 epochs); ``extra_info`` records the
transitions per second the update consumes.
"""

from __future__ import annotations

import pytest
import torch

from esper.simic.config import TrainingConfig
from esper.simic.ppo import PPOTrainer
from esper.simic.ppo_round import advantages, collect, update

ENVS, LENGTH = 8, 6


def _config(compile_loss: bool) -> TrainingConfig:
    return TrainingConfig().updated(
        task={"train_size": 64, "val_size": 32, "image_size": 8},
        kasmina={"batch_size": 32, "val_batch_size": 32},
        episode={"envs": ENVS, "length": LENGTH},
        heuristic={"warmup_epochs": 1},
        fixed={"epochs": [1]},
        ppo={"minibatch_envs": 4, "epochs": 2},
        compile=compile_loss,
    )


# A compiled-loss case is left out: torch.compile of ClipPPOLoss over the LSTM currently fails
# ("scan backward support is required") -- add it back when PPOTrainer's compile path works.
@pytest.mark.parametrize("mode", ["eager"])
def test_ppo_update(benchmark, mode: str) -> None:
    trainer = PPOTrainer(_config(mode == "compiled"))
    batch = advantages(trainer, collect(trainer))
    trainer.modules.train()
    sched = trainer.schedule()
    update(trainer, batch, sched)  # warm-up (compiles the loss in compiled mode)
    benchmark.pedantic(lambda: update(trainer, batch, sched), rounds=3, iterations=1)
    p = trainer.cfg.ppo
    benchmark.extra_info.update(
        {"mode": mode, "envs": ENVS, "length": LENGTH, "ppo_epochs": p.epochs}
    )
    benchmark.extra_info["transitions_per_s"] = (
        ENVS * LENGTH * p.epochs / benchmark.stats.stats.mean
    )
    metrics = update(trainer, batch, sched)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    assert 1 <= metrics["passes"] <= p.epochs
