"""Conservative Q-learning (``esper.train --policy cql``) on torchrl's DiscreteCQLLoss."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from tiny_config import TINY
from torch import nn
from torchrl.modules.value_norm import RunningValueNorm

from esper import generate, train
from esper.simic.checkpoint import load_checkpoint, load_policy
from esper.simic.config import TrainingConfig
from esper.simic.cql import FactoredCQLLoss, with_next_masks
from esper.simic.env import MorphogeneticEnv
from esper.simic.offline import OfflineConfig, OfflineTrainer
from esper.simic.packs import read_pack
from esper.tamiyo.lstm_policy import PolicyShape, TamiyoModules

TINY6 = copy.deepcopy(TINY) | {"episode": {"length": 6, "envs": 4}}


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cql")
    (tmp / "c.json").write_text(json.dumps(TINY6))
    rc = generate.main(["--policies", "heuristic", "--episodes", "2", "--config", str(tmp / "c.json"),
                        "--backends", "none", "--out", str(tmp / "pack")])
    assert rc == 0
    return tmp / "pack"


def test_losses_are_torchrl_cql_over_legal_ops_only() -> None:
    """Q loss = 0.5 (Q(s,a) - r - gamma max_{legal a'} Q(s',a'))^2 and the conservative term
    = logsumexp over legal ops - Q(s,a), checked by hand; an illegal op with a huge Q moves neither."""
    torch.manual_seed(0)
    e, t, f, gamma = 2, 3, 4, 0.9
    net = nn.Linear(f, 5)
    with torch.no_grad():
        net.bias[4] = 10.0  # FOSSILIZE: huge Q, and illegal everywhere below
    shape = PolicyShape(obs_size=f, n_slots=3, n_blueprints=2, n_tempos=3, hidden_size=8, lstm_hidden_size=8)
    loss = FactoredCQLLoss(TamiyoModules(shape, RunningValueNorm(shape=1)), f, 8, gamma=gamma, temperature=1.0,
                           qnet=net)
    obs = torch.randn(e, t, f)
    mask = torch.tensor([True, True, False, True, False]).expand(e, t, 5).clone()
    mask[0, 1, 3] = False
    op = torch.tensor([[0, 1, 0], [3, 0, 1]])
    reward = torch.randn(e, t, 1)
    done = torch.zeros(e, t, 1, dtype=torch.bool)
    done[:, -1] = True
    td = TensorDict({"observation": obs, "op": op, "op_mask": mask, "legal": torch.ones(e, t, dtype=torch.bool),
                     ("next", "observation"): torch.cat([obs[:, 1:], obs[:, -1:]], 1),
                     ("next", "reward"): reward, ("next", "done"): done, ("next", "terminated"): done.clone()},
                     batch_size=[e, t])
    with_next_masks(td)
    qloss, _ = loss.value_loss(td)
    cql, _ = loss.cql_loss(td)
    with torch.no_grad():
        q = net(obs)
        q_next = net(td["next", "observation"]).masked_fill(~td["next", "op_mask"], float("-inf")).max(-1).values
        target = reward.squeeze(-1) + gamma * (~done.squeeze(-1)).float() * q_next
        q_a = q.gather(-1, op.unsqueeze(-1)).squeeze(-1)
        want_q = (0.5 * (q_a - target) ** 2).mean()
        want_cql = (torch.logsumexp(q.masked_fill(~mask, float("-inf")), -1) - q_a).mean()
    torch.testing.assert_close(qloss, want_q)
    torch.testing.assert_close(cql, want_cql)
    assert want_cql < 1.0  # with FOSSILIZE in the logsumexp it would be about 10


def test_cql_learns_the_heuristic_ops_conservatively(pack: Path) -> None:
    data, meta = read_pack(pack)
    cfg = TrainingConfig.from_dict(meta["config"]).updated(ppo={"hidden_size": 32, "lstm_hidden_size": 32})
    trainer = OfflineTrainer(pack, OfflineConfig(method="cql", holdout=0.0, lr=3e-3, q_hidden=32), cfg=cfg,
                             data=(data, meta))
    assert trainer.cql is not None
    td = trainer.train_data

    def greedy_agreement() -> float:
        q = trainer.cql.q_values(td).masked_fill(~td["op_mask"], float("-inf"))
        return float((q.argmax(-1) == td["op"]).float().mean())

    before_q, before = greedy_agreement(), trainer.agreement(held_out=False)
    history = trainer.train(150)
    after_q, after = greedy_agreement(), trainer.agreement(held_out=False)
    assert history[-1].extra["cql"] < 0.5 * history[0].extra["cql"]  # data actions now top the legal Q
    assert after_q >= 0.9 and after_q > before_q, (before_q, after_q)
    assert after["op"] >= 0.9 and after["op"] > before["op"], (before, after)
    assert after["action_nonwait"] >= 0.8, after


def test_cql_command_trains_a_loadable_checkpoint(pack: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "cql.pt"
    rc = train.main(["--policy", "cql", "--data", str(pack), "--offline-epochs", "2", "--save", str(ckpt)])
    out = capsys.readouterr().out
    assert rc == 0 and "epoch    2  loss" in out and " cql " in out and "action agreement" in out
    saved = load_checkpoint(ckpt)
    assert saved["offline"]["method"] == "cql" and saved["offline"]["epochs"] == 2
    env = MorphogeneticEnv(TrainingConfig.from_dict(TINY6))
    load_policy(ckpt, env, deterministic=True)
    assert torch.equal(env.features.norm.mean, saved["obs_norm"]["mean"])
