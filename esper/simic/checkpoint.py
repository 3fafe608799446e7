"""PPO checkpoints: one file, written atomically, validated on load with errors naming the file;
whether a run can resume one; and the trained policies they hold, registered as ``ppo`` and
``ppo_sample`` (a bare ``ppo`` is the controller shipped as package data)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torchrl.modules.value_norm import RunningValueNorm

from esper.atomic import atomic_write
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.errors import CheckpointError
from esper.tamiyo.lstm_policy import PolicyShape, RecurrentPolicy, TamiyoModules
from esper.tamiyo.policies import PolicyEnv, register_policy

CHECKPOINT_VERSION = 1
REQUIRED_KEYS: tuple[str, ...] = (
    "version",
    "round",
    "config",
    "policy_shape",
    "modules",
    "optimizer",
    "obs_norm",
    "env_episode",
    "rng",
    "history",
)


def provenance() -> dict[str, Any]:
    """What made a checkpoint: the command line, the code version (package version and, in a
    git checkout, the commit and whether the tree was dirty) and when."""
    import subprocess
    import sys
    import time
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("esper-morphogenetic")
    except PackageNotFoundError:
        pkg = None
    root = Path(__file__).resolve().parents[2]
    git: dict[str, Any] | None = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
        git = {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        git = None
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0] if sys.argv else '?'}"
    return {
        "command": " ".join([program, *sys.argv[1:]]),
        "code": {"package": pkg, "git": git},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    p = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{p}: refusing to write a checkpoint without {missing}")
    return atomic_write(p, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and structurally validate a checkpoint (tensors go to the CPU)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        why = _load_problem(err)
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt or truncated?): {why}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{p}: expected a checkpoint dict, found {type(payload).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{p}: not an Esper PPO checkpoint (missing {missing})")
    if payload["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint version {payload['version']}, this build reads {CHECKPOINT_VERSION}"
        )
    return payload


def _load_problem(err: Exception) -> str:
    """One line saying why ``torch.load`` failed. Its weights-only message spans lines of advice
    (re-run with ``weights_only=False``, wrong for a damaged file); the unpickler's own words are
    kept, or the first line, or the error's type when it has no words (an empty file)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_matches(path: str | Path, what: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise naming every (nested, dotted) field of ``what`` that differs between the checkpoint
    and this run."""
    saved, current = _flatten(saved), _flatten(current)
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != run {current.get(k)!r}" for k in keys
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: {what} mismatch: " + "; ".join(diffs))


def check_resumable(path: str | Path, ckpt: dict[str, Any], cfg: TrainingConfig, envs: int) -> None:
    """The run stored in ``ckpt`` can go on as ``cfg`` over ``envs`` envs: the same env count and
    the same learning setting (more rounds allowed). Needs no env, so the CLI checks it before
    any work (``preflight.check_resume``); :meth:`~esper.simic.ppo.PPOTrainer.resume` checks it again."""
    saved = TrainingConfig.from_dict(ckpt["config"], str(path)).model_dump(mode="json")
    now = cfg.model_dump(mode="json")
    # the episode length scales observations and rewards, its seed names the envs; the features
    # section builds the observations the policy learned on
    learn = ("task", "kasmina", "reward", "ppo", "history_length", "episode", "features")
    for c in (saved, now):
        c["ppo"].pop("rounds")  # a resumed run may train for more rounds (same schedule horizon)
        c["ppo"].pop("heldout_hosts", None)  # how the run is watched, not what it learns
        c["episode"].pop("envs")  # checked apart, against the checkpoint's env rows
        c["episode"].pop("episodes")  # episodes per env of a controller run, not read by PPO
    check_matches(path, "env count", {"envs": int(ckpt["env_episode"].numel())}, {"envs": envs})
    check_matches(path, "config", {k: saved[k] for k in learn}, {k: now[k] for k in learn})


# ----------------------------------------------------------------------------- trained policies
def load_policy(path: str | Path, env: MorphogeneticEnv, deterministic: bool) -> RecurrentPolicy:
    """A trained actor for ``simic.runner``; the env's observation normalizer takes the
    checkpoint's statistics and is frozen, so observations match what the policy learned on."""
    ckpt = load_checkpoint(path)
    saved = PolicyShape(**ckpt["policy_shape"])
    observe = ckpt["config"].get("features", {}).get("observe", "minimal")
    check_matches(path, "observation (features.observe)", {"observe": observe},
                  {"observe": env.cfg.features.observe})
    current = {"obs_size": env.schema.size, "n_slots": len(env.slots)}
    check_matches(path, "env layout", {k: getattr(saved, k) for k in current}, current)
    norm = env.features.norm
    if norm is not None:
        norm.load_state_dict(ckpt["obs_norm"])
        norm.eval()
    modules = TamiyoModules(saved, RunningValueNorm(shape=1)).to(env.device)
    modules.load_state_dict(ckpt["modules"])
    try:
        modules.use_blueprints(env.blueprint_names)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    modules.eval()
    return RecurrentPolicy(modules, env.n, deterministic=deterministic)


def shipped_controller() -> Path | None:
    """The trained Tamiyo that ships as package data (``esper/simic/controllers/tamiyo.pt``),
    or None in an install without one (``bench/train_controller.sh`` reproduces it)."""
    path = Path(str(resources.files("esper.simic") / "controllers" / "tamiyo.pt"))
    return path if path.is_file() else None


def checkpoint_for(arg: str | None, name: str) -> str:
    """``name=PATH``'s path; a bare ``ppo`` is the shipped controller."""
    if arg:
        return arg
    shipped = shipped_controller()
    if shipped is None:
        raise ValueError(f"policy {name!r} needs a checkpoint ({name}=PATH): this install ships none")
    return str(shipped)


@register_policy("ppo")
def _ppo(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> RecurrentPolicy:
    """Trained LSTM policy, greedy (per-head mode, op first); bare ``ppo`` is the shipped one."""
    try:
        return load_policy(checkpoint_for(arg, "ppo"), env, deterministic=True)  # type: ignore[arg-type]
    except CheckpointError as err:
        raise ValueError(str(err)) from err


@register_policy("ppo_sample")
def _ppo_sample(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> RecurrentPolicy:
    """Trained LSTM policy, sampled actions (seeded from ``seed``)."""
    torch.manual_seed(seed)
    try:
        return load_policy(checkpoint_for(arg, "ppo_sample"), env, deterministic=False)  # type: ignore[arg-type]
    except CheckpointError as err:
        raise ValueError(str(err)) from err
