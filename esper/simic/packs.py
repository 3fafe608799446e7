"""Episode data packs: self-describing, memory-mapped recordings of whole episodes.

A pack is a directory::

    PACK/
      meta.json     format and version, observation schema, action space, telemetry profile,
                    reward config, TrainingConfig dump, generating command, policies, the key
                    layout of ``data``, ``quick_stats``, and per episode its ``summary``
                    (trajectory, key moments, outcome) and ``decisions`` (observation, action,
                    decision_context, hindsight): see :mod:`esper.simic.pack_meta`
      data/         a ``[E, T]`` TensorDict (E episodes of T steps), tensordict memmap
      obs_norm/     the observation normalizer's tensors (``mean``, ``var``, ``count``), memmap

``data`` keys (torchrl's layout: what the step led to lives under ``"next"``):

* ``observation [E, T, F]``: the observation the policy saw, normalized by the env's *running*
  normalizer at collection time (its statistics moved while the pack was recorded);
* ``observation_final [E, T, F]``: the same steps normalized by the pack's final, frozen
  ``obs_norm`` (the exact FeatureBuilder code path); a policy trained on these and loaded with
  the pack's ``obs_norm`` (``load_policy`` freezes it) sees the same numbers at evaluation;
* ``observation_raw [E, T, F]``: un-normalized features in schema order;
* ``op_mask [E,T,5]``, ``slot_mask [E,T,5,S]``, ``blueprint_mask``, ``tempo_mask``;
* actions ``op, slot, blueprint, tempo`` (int64), ``reason`` (index into ``leyline.REASONS``,
  -1 when the policy gives none), ``<head>_log_prob`` (0 for policies that write none, e.g. the
  deterministic rule policies; the actor's log-probability for learned ones);
* ``is_init [E, T, 1]`` (True at t = 0), ``policy_id [E, T]`` (index into ``meta["policies"]``);
* ``("next", "reward") [E,T,1]``, ``("next", "reward_components", <name>)``,
  ``("next", "done" | "terminated" | "truncated") [E,T,1]``.

Writes are atomic (a temp directory beside the target, renamed into place). :func:`read_pack`
refuses a pack whose observation schema differs from the code's with :class:`PackSchemaError`
naming the differing fields. No pickles: tensors are raw memmaps, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from esper.leyline import HEADS, REASONS, SCHEMA_VERSION, TEMPOS, ObservationSchema, Op
from esper.simic.errors import PackError, PackSchemaError
from esper.simic.pack_meta import episode_entry, fill_observations, quick_stats

PACK_FORMAT = "esper-episode-pack"
PACK_VERSION = 1
MASK_KEYS: tuple[str, ...] = tuple(f"{h}_mask" for h in HEADS)
LOG_PROB_KEYS: tuple[str, ...] = tuple(f"{h}_log_prob" for h in HEADS)
NEXT_KEYS: tuple[str, ...] = ("reward", "done", "terminated", "truncated")

__all__ = [
    "LOG_PROB_KEYS",
    "MASK_KEYS",
    "PACK_FORMAT",
    "PACK_VERSION",
    "PackBuilder",
    "PackError",
    "PackSchemaError",
    "check_out_dir",
    "read_pack",
    "schema_differences",
    "write_pack",
]


def _schema_dict(schema: ObservationSchema) -> dict[str, Any]:
    return {**schema.to_dict(), "size": schema.size}


def schema_differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Human-readable differences between two schema dicts (``ObservationSchema.to_dict`` + size)."""
    diffs: list[str] = []
    for key in ("version", "size", "history_length", "blueprints", "slots"):
        if saved.get(key) != expected.get(key):
            diffs.append(f"{key}: pack {saved.get(key)!r} != code {expected.get(key)!r}")
    s_names, e_names = list(saved.get("names") or []), list(expected.get("names") or [])
    if s_names != e_names:
        missing = [n for n in e_names if n not in s_names]
        extra = [n for n in s_names if n not in e_names]
        what = []
        if missing:
            what.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            what.append(f"unknown {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if not what:
            moved = [n for i, n in enumerate(s_names) if i >= len(e_names) or e_names[i] != n]
            what.append(f"reordered from {moved[0]!r}")
        diffs.append("names: " + ", ".join(what))
    return diffs


def _expected_schema(saved: dict[str, Any]) -> dict[str, Any]:
    """What this code lays out for the pack's declared history/blueprints/slots."""
    try:
        schema = ObservationSchema(
            history_length=int(saved["history_length"]),
            blueprints=tuple(saved["blueprints"]),
            slots=tuple(saved["slots"]),
            extras=tuple(saved.get("extras", ())),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise PackSchemaError(f"observation schema is malformed: {err}") from err
    return _schema_dict(schema)


# ----------------------------------------------------------------------------- writing
def check_out_dir(path: str | Path) -> str | None:
    """Why ``path`` cannot receive a new pack (None when it can): it must not exist or be an
    empty directory, and its nearest existing ancestor must be a writable directory."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return "exists and is not a directory"
        if any(p.iterdir()):
            return "exists and is not empty"
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"parent directory {parent} is not writable"
    try:  # the permission bits do not tell everything (root, read-only mounts, /proc)
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".esper-pack-probe."))
    except OSError as err:
        return f"parent directory {parent} is not writable ({err.strerror})"
    return None


def write_pack(
    path: str | Path,
    data: TensorDictBase,
    meta: dict[str, Any],
    obs_norm: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``data`` (``[E, T]``), ``meta`` and the normalizer tensors into ``path`` atomically.

    ``path`` must not exist or be an empty directory. ``meta`` gets ``format``,
    ``format_version``, the shape and the key layout of ``data`` added.
    """
    out = Path(path)
    why = check_out_dir(out)
    if why is not None:
        raise PackError(f"{out}: cannot write a pack there: {why}")
    if data.batch_dims != 2:
        raise PackError(f"{out}: pack data must be [episodes, steps], got batch {tuple(data.batch_size)}")
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    data = data.cpu()
    layout = {
        ".".join(k) if isinstance(k, tuple) else k: {"dtype": str(v.dtype).removeprefix("torch."),
                                                     "shape": list(v.shape)}
        for k, v in data.items(include_nested=True, leaves_only=True)
    }
    full = {
        "format": PACK_FORMAT,
        "format_version": PACK_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "episodes_count": int(data.batch_size[0]),
        "steps": int(data.batch_size[1]),
        **meta,
        "keys": layout,
    }
    tmp = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        data.memmap_(tmp / "data")
        norm = TensorDict({k: v.detach().cpu() for k, v in (obs_norm or {}).items()}, batch_size=[])
        norm.memmap_(tmp / "obs_norm")
        full["pack_id"] = content_id(tmp)
        with open(tmp / "meta.json", "w") as f:
            json.dump(full, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():  # an empty directory: rename replaces it atomically
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def content_id(root: Path) -> str:
    """``sha256:<hex>`` over the pack's tensor files (relative paths and bytes, sorted), so a
    checkpoint can name the exact data it learned from and a damaged pack is noticed."""
    h = hashlib.sha256()
    for sub in ("data", "obs_norm"):
        base = root / sub
        if not base.is_dir():
            continue
        for f in sorted(x for x in base.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return f"sha256:{h.hexdigest()}"


# ----------------------------------------------------------------------------- reading
def read_pack(
    path: str | Path, schema: ObservationSchema | None = None
) -> tuple[TensorDictBase, dict[str, Any]]:
    """The pack's ``[E, T]`` TensorDict (memory-mapped; ``.clone()`` for an in-memory copy) and
    its meta dict, with ``meta["obs_norm_state"]`` holding the normalizer tensors.

    The pack's observation schema must be the one this code lays out (its version and feature
    names for the pack's history/blueprints/slots) and, when ``schema`` is given, equal to it
    (e.g. ``env.schema`` of the run that will use the pack); otherwise :class:`PackSchemaError`.
    """
    p = Path(path)
    meta_file = p / "meta.json"
    if not meta_file.is_file():
        raise PackError(f"{p}: not an episode pack (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PackError(f"{p}: meta.json is unreadable: {err}") from err
    if meta.get("format") != PACK_FORMAT:
        raise PackError(f"{p}: not an Esper episode pack (format {meta.get('format')!r})")
    if meta.get("format_version") != PACK_VERSION:
        raise PackError(f"{p}: pack format version {meta.get('format_version')!r}, this build reads {PACK_VERSION}")
    saved = meta.get("schema") or {}
    if saved.get("version") != SCHEMA_VERSION:
        raise PackSchemaError(
            f"{p}: observation schema differs from the code's: version: pack {saved.get('version')!r} "
            f"!= code {SCHEMA_VERSION}"
        )
    expected = _schema_dict(schema) if schema is not None else _expected_schema(saved)
    diffs = schema_differences(saved, expected)
    if diffs:
        raise PackSchemaError(f"{p}: observation schema differs from the code's: " + "; ".join(diffs))
    if "pack_id" in meta and content_id(p) != meta["pack_id"]:
        raise PackError(f"{p}: pack data does not match its pack_id {meta['pack_id']} (modified or damaged)")
    try:
        data = TensorDict.load_memmap(p / "data")
        norm = TensorDict.load_memmap(p / "obs_norm") if (p / "obs_norm").is_dir() else TensorDict()
    except Exception as err:  # tensordict raises several types for a damaged directory
        raise PackError(f"{p}: pack data is unreadable: {err}") from err
    want = (int(meta["episodes_count"]), int(meta["steps"]))
    if tuple(data.batch_size) != want:
        raise PackError(f"{p}: data is {tuple(data.batch_size)}, meta.json says {want}")
    meta["obs_norm_state"] = {k: v.clone() for k, v in norm.items()}
    return data, meta


# ----------------------------------------------------------------------------- building
class PackBuilder:
    """Accumulates collector batches (``[N, T]``, one episode of every env) of one env and
    builds the pack data and meta.

    Observations are recomputed at the end from the recorded signals and tracker with the env's
    :class:`FeatureBuilder` (raw, and normalized by the final frozen normalizer), so every
    episode, whichever policy and normalizer state produced it, is expressed in the statistics
    saved with the pack.
    """

    def __init__(self, env: Any) -> None:
        self.env = env
        self.parts: list[TensorDictBase] = []
        self.policies: list[str] = []
        self.episodes: list[dict[str, Any]] = []
        self.ops: torch.Tensor | None = None  # every recorded op [E, T], once built

    def add(self, batch: TensorDictBase, summaries: list[Any], policy: str) -> None:
        n, t = batch.batch_size
        if policy not in self.policies:
            self.policies.append(policy)
        pid = self.policies.index(policy)
        dev = batch.device if batch.device is not None else torch.device("cpu")
        out = batch.select("observation", *MASK_KEYS, *HEADS, "signals", "tracker").clone()
        out.set("reason", batch.get("reason", torch.full((n, t), -1, dtype=torch.long, device=dev)).long())
        for key in LOG_PROB_KEYS:
            lp = batch.get(key, None)
            out.set(key, lp.float().reshape(n, t) if lp is not None else torch.zeros(n, t, device=dev))
        for key in HEADS:
            out.set(key, out.get(key).long())
        is_init = torch.zeros(n, t, 1, dtype=torch.bool, device=dev)
        is_init[:, 0] = True
        out.set("is_init", is_init)
        out.set("policy_id", torch.full((n, t), pid, dtype=torch.long, device=dev))
        for key in NEXT_KEYS:
            out.set(("next", key), batch.get(("next", key)).clone())
        out.set(("next", "reward_components"), batch.get(("next", "reward_components")).clone())
        self.parts.append(out)
        by_env = {int(s.env): s for s in summaries}
        for i in range(n):
            entry = episode_entry(by_env.get(i), len(self.episodes), policy)
            entry.setdefault("env", i)
            self.episodes.append(entry)

    @torch.no_grad()
    def build(self) -> TensorDict:
        """The ``[E, T]`` pack data (signals and tracker dropped after recomputing observations)."""
        if not self.parts:
            raise PackError("no episodes were recorded")
        data = torch.cat(self.parts, dim=0)
        e, t = data.batch_size
        features = self.env.features
        signals = data.get("signals").reshape(-1).to(self.env.device)
        tracker = data.get("tracker").reshape(-1).to(self.env.device)
        raw = features.raw(tracker, signals)
        norm = features.norm
        was_training = norm.training if norm is not None else False
        if norm is not None:
            norm.eval()
        try:
            final = features(tracker, signals)
        finally:
            if norm is not None and was_training:
                norm.train()
        data = data.exclude("signals", "tracker")
        data.set("observation_raw", raw.reshape(e, t, -1).to(data.device))
        fill_observations(self.episodes, data.get("observation_raw"), self.env.schema)
        self.ops = data.get("op")
        data.set("observation_final", final.reshape(e, t, -1).to(data.device))
        return data

    def meta(self, cfg: Any, profile_name: str, command: str) -> dict[str, Any]:
        env = self.env
        return {
            "command": command,
            "esper_version": _version(),
            "schema": _schema_dict(env.schema),
            "actions": {
                "heads": list(HEADS),
                "ops": [o.name.lower() for o in Op],
                "slots": list(env.slots),
                "blueprints": list(env.blueprint_names),
                "tempos": list(TEMPOS),
            },
            "reasons": list(REASONS),
            "telemetry_profile": profile_name,
            "reward": cfg.reward.model_dump(mode="json"),
            "gamma": cfg.ppo.gamma,
            "config": cfg.model_dump(mode="json"),
            "policies": list(self.policies),
            "obs_norm": {"path": "obs_norm", "normalized_keys": ["observation", "observation_final"]},
            "quick_stats": quick_stats(self.episodes, self.ops) if self.ops is not None else None,
            "episodes": list(self.episodes),
        }

    def obs_norm_state(self) -> dict[str, torch.Tensor]:
        norm = self.env.features.norm
        return {k: v.detach().cpu().clone() for k, v in norm.state_dict().items()} if norm is not None else {}


def _version() -> str:
    try:
        from esper import __version__
    except ImportError:  # pragma: no cover
        return "unknown"
    return str(__version__)
