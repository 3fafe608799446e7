"""Does cull + germinate cover "change a seed's blueprint"? (issue 28, item 4)

Scripted episode of 2 envs on the tiny setting: both germinate ``norm`` in ``late`` at epoch 0
and cull it after 3 epochs; then env 0 germinates ``conv_small`` in another free slot (``mid``)
and env 1 retries ``conv_small`` in the same slot. Prints how many epochs after the cull the
new blueprint is in place. Run: ``python bench/blueprint_change.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_config import TINY

from esper.leyline import Op, SeedStage
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv
from esper.simic.runner import collector_for

L, CULL_AT = 10, 3


def main() -> None:
    cfg = TrainingConfig.from_dict(merge_config(TINY, {"episode": {"length": L, "envs": 2}}))
    env = MorphogeneticEnv(cfg)
    slots, bps = list(env.slots), list(env.blueprint_names)
    late, mid = slots.index("late"), slots.index("mid")
    a, b = bps.index("norm"), bps.index("conv_small")

    def script(td):
        t = int(td["signals", "epoch"].reshape(-1)[0])  # epochs trained so far (lockstep envs)
        n = td.batch_size[0]
        op, slot, bp = torch.zeros(n, dtype=torch.long), torch.full((n,), late), torch.full((n,), a)
        if t == 0:
            op[:] = Op.GERMINATE
        elif t == CULL_AT:
            op[:] = Op.CULL
        elif t > CULL_AT:
            op[:], bp[:], slot[0] = Op.GERMINATE, b, mid
        for k, v in (("op", op), ("slot", slot), ("blueprint", bp), ("tempo", torch.zeros(n, dtype=torch.long))):
            td.set(k, v)
        return td

    batch = next(iter(collector_for(env, script, 1)))
    stage, ok = batch["next", "signals", "stage"], batch["next", "signals", "action_accepted"]
    for i, s, how in ((0, mid, "another free slot"), (1, late, "the same slot")):
        done = [t for t in range(CULL_AT + 1, L) if ok[i, t]]
        path = " ".join(SeedStage(int(x)).name[:4] for x in stage[i, :, s])
        print(f"conv_small in {how} ({slots[s]}): in place {done[0] - CULL_AT if done else 'never'} epoch(s) "
              f"after the cull decision; {slots[s]} stages by epoch: {path}")


if __name__ == "__main__":
    main()
