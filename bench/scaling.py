"""Scaling study: env-epochs/s and peak memory vs N, eager vs compiled, blueprint strategy.

``python bench/scaling.py --device cpu --out bench/scaling.json``

Each configuration runs in a fresh subprocess (so peak memory is its own: on the CPU the
``ru_maxrss`` growth from just before the batch is built; on CUDA
``torch.cuda.max_memory_allocated``). A configuration is one ``MorphogeneticBatch`` with a seed
germinated in every env (blueprint ``i % B``, slot ``i % 3``), one warm-up epoch, then the
median of ``--reps`` full epochs. ``--loop-at`` also times the loop over N ``ReferenceHost``
modules at those N.

Blueprint strategy: the engine computes every registered blueprint in each slot, masked by a
per-env one-hot (static shapes: no recompiles, no syncs). ``blueprints=one`` restricts the set
to the single blueprint in use: the lower bound of grouping envs by blueprint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _worker(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    sys.path.insert(0, str(HERE))
    from workloads import Workload, batched_epoch, loop_epoch, median_time, seeded_batch

    device, n = spec["device"], spec["n"]
    work = Workload()
    task = work.task(device)
    kw: dict = {"compile": spec["mode"] == "compiled"}
    if spec["blueprints"] != "all":
        kw["blueprints"] = (spec["blueprints"],)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = seeded_batch(task, n, work.config(**kw))
    epoch = batched_epoch(mb)
    epoch()
    seconds = median_time(epoch, spec["reps"], device)
    out = {**spec, "epoch_s": seconds, "env_epochs_per_s": n / seconds}
    if device == "cuda":
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        out["peak_mem_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    if spec.get("loop"):
        loop = loop_epoch(mb)
        loop()
        out["loop_epoch_s"] = median_time(loop, max(1, spec["reps"] - 1), device)
        out["loop_env_epochs_per_s"] = n / out["loop_epoch_s"]
        out["speedup_vs_loop"] = out["loop_epoch_s"] / seconds
    return out


def _run(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    info["loadavg"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(HERE / "scaling.json"))
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 1..64; to 1024 on CUDA)")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--strategy-at", default="8,64", help="N at which to compare blueprint sets")
    ap.add_argument("--strategy-blueprints", default="conv_heavy,norm")
    ap.add_argument("--loop-at", default="64", help="N at which to time the nn.Module loop too")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    default = "1,2,4,8,16,32,64" + (",128,256,512,1024" if args.device == "cuda" else "")
    sizes = [int(s) for s in (args.sizes or default).split(",")]
    loop_at = {int(s) for s in args.loop_at.split(",") if s}
    specs = []
    for mode in args.modes.split(","):
        for n in sizes:
            specs.append({"device": args.device, "n": n, "mode": mode, "blueprints": "all",
                          "reps": args.reps, "loop": mode == "eager" and n in loop_at})  # fmt: skip
    for n in (int(s) for s in args.strategy_at.split(",") if s):
        for bp in args.strategy_blueprints.split(","):
            specs.append({"device": args.device, "n": n, "mode": "eager", "blueprints": bp,
                          "reps": args.reps, "loop": False})  # fmt: skip
    rows = []
    for spec in specs:
        row = _run(spec, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)  # write then rename: an interrupted run never leaves half a file
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
