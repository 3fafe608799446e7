"""DiagnosticTracker: exactly the profile's features, on device, materialized in one transfer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from esper.nissa import (
    PROFILE_NAMES,
    DiagnosticTracker,
    JsonlBackend,
    NissaHub,
    activation_stats,
    apply_overrides,
    count_host_syncs,
    epoch_event,
    load_profile,
    loss_sharpness,
    materialize,
    per_class_metrics,
    weight_norms,
)

N, B, K = 3, 16, 4
METRICS = {"metrics.val_accuracy", "metrics.val_loss"}
STANDARD = METRICS | {
    f"gradients.{k}"
    for k in ("total_norm", "norm", "nonfinite", "frac_vanishing", "frac_exploding", "max_abs", "mean", "std")
}
DIAGNOSTIC = STANDARD | {
    "gradients.percentiles",
    "per_class.count",
    "per_class.accuracy",
    "per_class.loss",
    "weights.norm",
}
RESEARCH = DIAGNOSTIC | {
    "gradients.histogram",
    "per_class.confusion",
    "activations.mean",
    "activations.std",
    "activations.frac_zero",
    "landscape.base_loss",
    "landscape.loss_std",
    "landscape.sharpness",
    "landscape.max_increase",
}
EXPECTED = {
    "minimal": METRICS,
    "standard": STANDARD,
    "diagnostic": DIAGNOSTIC,
    "research": RESEARCH,
}


def step_outputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(N, 5, 3, generator=g), torch.randn(N, 4, generator=g)]

    def loss_fn(ps: list[torch.Tensor]) -> torch.Tensor:
        return ps[0].pow(2).sum((1, 2)) + ps[1].pow(2).sum(1)

    return {
        "metrics": {
            "val_loss": torch.rand(N, generator=g),
            "val_accuracy": torch.rand(N, generator=g),
        },
        "grads": {
            "conv": torch.randn(N, 5, 3, generator=g) * 1e-3,
            "fc": torch.randn(N, 4, generator=g),
        },
        "logits": torch.randn(N, B, K, generator=g),
        "labels": torch.randint(0, K, (B,), generator=g),
        "params": params,
        "activations": [torch.relu(torch.randn(B, N, 6, generator=g))],
        "activation_env_dim": 1,
        "loss_fn": loss_fn,
        "generator": g,
    }


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profile_features_exactly_in_output_and_jsonl(name: str, tmp_path: Path) -> None:
    tracker = DiagnosticTracker(load_profile(name))
    with count_host_syncs() as syncs:
        td = tracker.collect(**step_outputs())
    assert syncs.count == 0, syncs.calls  # collecting never leaves the device
    assert td.batch_size == torch.Size([N])
    snap = materialize(td)
    assert set(snap) == EXPECTED[name]
    path = tmp_path / "t.jsonl"
    with NissaHub([JsonlBackend(path)]) as hub:
        hub.emit(epoch_event(snap, epoch=1))
    (line,) = path.read_text().splitlines()
    assert set(json.loads(line)["payload"]) == EXPECTED[name]


def test_required_inputs_follow_profile() -> None:
    assert DiagnosticTracker(load_profile("minimal")).required_inputs == frozenset()
    assert DiagnosticTracker(load_profile("standard")).required_inputs == {"grads"}
    assert DiagnosticTracker(load_profile("research")).required_inputs == {
        "grads",
        "logits",
        "labels",
        "params",
        "activations",
        "loss_fn",
    }
    with pytest.raises(ValueError, match=r"needs inputs \['grads'\]"):
        DiagnosticTracker(load_profile("standard")).collect(metrics={"loss": torch.zeros(N)})


def test_disabled_features_cost_nothing() -> None:
    """Minimal profile: inputs the profile does not need are never touched."""

    def boom(_: list[torch.Tensor]) -> torch.Tensor:
        raise AssertionError("loss_fn must not be called")

    out = step_outputs()
    out["loss_fn"] = boom
    td = DiagnosticTracker(load_profile("diagnostic")).collect(**out)
    assert "landscape" not in td


def test_gradient_layer_selection() -> None:
    cfg = apply_overrides(load_profile("standard"), ["gradients.layers=[fc]"])
    tracker = DiagnosticTracker(cfg)
    out = step_outputs()
    td = tracker.collect(grads=out["grads"])
    assert tracker.layer_names == ["fc"]
    assert td["gradients", "norm"].shape == (N, 1)
    torch.testing.assert_close(td["gradients", "norm"][:, 0], out["grads"]["fc"].norm(dim=1))
    bad = DiagnosticTracker(apply_overrides(cfg, ["gradients.layers=[nope]"]))
    with pytest.raises(KeyError, match="nope"):
        bad.collect(grads=out["grads"])


def test_per_class_metrics_match_loop() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, B, K, generator=g)
    labels = torch.randint(0, K - 1, (N, B), generator=g)  # class K-1 absent
    td = per_class_metrics(logits, labels)
    for n in range(N):
        pred = logits[n].argmax(-1)
        for k in range(K - 1):
            m = labels[n] == k
            if m.any():
                acc = (pred[m] == k).float().mean()
                loss = torch.nn.functional.cross_entropy(logits[n][m], labels[n][m])
                torch.testing.assert_close(td["accuracy"][n, k], acc)
                torch.testing.assert_close(td["loss"][n, k], loss)
        assert torch.isnan(td["accuracy"][n, K - 1])
        conf = torch.zeros(K, K)
        for t, p in zip(labels[n], pred, strict=True):
            conf[t, p] += 1
        torch.testing.assert_close(td["confusion"][n], conf)
    shared = per_class_metrics(logits, labels[0], loss=False, confusion=False)
    assert set(shared.keys()) == {"count", "accuracy"} and shared["count"].sum(1).eq(B).all()


def test_weight_norms_and_activation_stats() -> None:
    p = [torch.arange(6.0).reshape(2, 3), torch.ones(2, 2, 2)]
    torch.testing.assert_close(weight_norms(p), torch.tensor([[5**0.5, 2.0], [50**0.5, 2.0]]))
    a = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # [N=2, 2]
    st = activation_stats([a, a.T.contiguous().T], env_dim=0)
    torch.testing.assert_close(st["mean"][:, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(st["std"][:, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(st["frac_zero"][:, 0], torch.tensor([0.5, 1.0]))
    bn = activation_stats([a.T], env_dim=1)  # [B, N] layout gives the same per-env stats
    torch.testing.assert_close(bn["mean"][:, 0], torch.tensor([1.0, 0.0]))


def test_sharpness_relative_scale() -> None:
    """For L = ||p||^2 and antithetic perturbations of norm s*||p||: sharpness = s^2 ||p||^2."""
    p = torch.stack([torch.ones(8), 2 * torch.ones(8), torch.zeros(8)])  # [3, 8]
    g = torch.Generator().manual_seed(0)
    td = loss_sharpness(lambda ps: ps[0].pow(2).sum(1), [p], samples=3, scale=0.1, generator=g)
    base = p.pow(2).sum(1)
    torch.testing.assert_close(td["base_loss"], base)
    torch.testing.assert_close(td["sharpness"], 0.01 * base)
    assert (td["max_increase"] >= td["sharpness"]).all() and (td["loss_std"][:2] > 0).all()
    assert td["sharpness"][2] == 0  # zero parameters are not perturbed


def test_materialize_nested_many_leaves_one_sync() -> None:
    td = TensorDict(
        {
            "a": {f"x{i}": torch.randn(N, i + 1) for i in range(20)},
            "b": {
                "c": {
                    "d": torch.ones(N, 2, dtype=torch.bool),
                    "e": torch.arange(N * 3).reshape(N, 3),
                }
            },
            "f": torch.randn(N, 2, 2, dtype=torch.float16),
            "g": torch.randint(0, 5, (N,), dtype=torch.int32),
        },
        batch_size=[N],
    )
    with count_host_syncs() as syncs:
        snap = materialize(td)
    assert syncs.count == 1, syncs.calls
    assert len(snap) == 24
    assert snap["b.c.d"].dtype == np.bool_ and snap["b.c.d"].all()
    assert snap["b.c.e"].dtype == np.int64 and snap["b.c.e"].tolist() == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
    ]
    assert snap["g"].dtype == np.int32
    np.testing.assert_allclose(snap["a.x7"], td["a", "x7"].numpy(), rtol=1e-6)
    assert snap["f"].shape == (N, 2, 2)
    assert materialize(TensorDict({}, batch_size=[N])) == {}


def test_sync_counter_sees_conversions() -> None:
    t = torch.ones(3)
    with count_host_syncs() as syncs:
        t.sum().item()
        t.tolist()
        bool(t.any())
        np.asarray(t)
        float(t[0])
    assert syncs.calls == ["item", "tolist", "__bool__", "__array__", "__float__"]
    assert torch.Tensor.item.__name__ == "item"  # restored


@pytest.mark.cuda
def test_cuda_collect_without_syncs_and_one_transfer() -> None:
    out = step_outputs()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    moved = {
        "metrics": {k: v.to(dev) for k, v in out["metrics"].items()},
        "grads": {k: v.to(dev) for k, v in out["grads"].items()},
        "logits": out["logits"].to(dev),
        "labels": out["labels"].to(dev),
        "params": [p.to(dev) for p in out["params"]],
        "activations": [a.to(dev) for a in out["activations"]],
        "activation_env_dim": 1,
        "loss_fn": out["loss_fn"],
        "generator": gen,
    }
    tracker = DiagnosticTracker(load_profile("research"))
    tracker.collect(**moved)  # warm-up (first calls may initialize lazily)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a sync raises here, its traceback names the line
    try:
        tracker.collect(**moved)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with count_host_syncs() as syncs:
        td = tracker.collect(**moved)
    assert syncs.count == 0 and syncs.cuda_syncs == 0, syncs
    with count_host_syncs() as syncs:
        snap = materialize(td)
    assert syncs.count == 1 and syncs.cuda_syncs <= 1, syncs
    assert set(snap) == RESEARCH
