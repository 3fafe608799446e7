"""PPO's keyed sampling: exact draws from the policy, legal, and the same for env i in any batch."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper import rng
from esper.leyline import NUM_OPS
from esper.simic.sampling import KeyedFactoredDistribution


def _params(n: int, noise: torch.Tensor | None) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    op_logits = torch.randn(NUM_OPS, generator=g).expand(n, NUM_OPS)
    op_mask = torch.tensor([True, True, False, True, True]).expand(n, NUM_OPS)
    slot_mask = torch.zeros(n, NUM_OPS, 3, dtype=torch.bool)
    slot_mask[:, :, 1:] = True
    td = {
        "op": {"logits": op_logits, "mask": op_mask},
        "slot": {"logits": torch.randn(NUM_OPS, 3, generator=g).expand(n, NUM_OPS, 3), "mask": slot_mask},
        "blueprint": {"logits": torch.zeros(n, 2), "mask": torch.ones(n, 2, dtype=torch.bool)},
        "tempo": {"logits": torch.zeros(n, 3), "mask": torch.ones(n, 3, dtype=torch.bool)},
    }
    if noise is not None:
        td["noise"] = noise
    return TensorDict(td, batch_size=[n])


def _gumbel(keys: torch.Tensor, width: int) -> torch.Tensor:
    return -torch.log(-torch.log(rng.uniform(keys, (width,)).clamp_min(2.0 ** -25)))


def test_gumbel_max_draws_follow_the_masked_policy() -> None:
    n, width = 40_000, NUM_OPS + 3 + 2 + 3
    noise = _gumbel(rng.stream_key(torch.arange(n), 11), width)
    dist = KeyedFactoredDistribution(_params(n, noise))
    draw = dist.sample()
    freq = torch.bincount(draw["op"], minlength=NUM_OPS).float() / n
    probs = dist.dists["op"].probs[0]
    assert freq[2] == 0 and (draw["slot"] != 0).all()  # illegal op and slot never drawn
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert (dist.log_prob(draw) <= 0).all()


def test_env_draws_do_not_depend_on_the_batch() -> None:
    width = NUM_OPS + 3 + 2 + 3
    keys = rng.stream_key(torch.arange(6), 5)
    batch = KeyedFactoredDistribution(_params(6, _gumbel(keys, width))).sample()
    part = KeyedFactoredDistribution(_params(2, _gumbel(keys[4:], width))).sample()
    for head in ("op", "slot", "blueprint", "tempo"):
        assert torch.equal(batch[head][4:], part[head])
