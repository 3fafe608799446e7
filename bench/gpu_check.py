"""Every GPU figure from one short loan (issue 14 item 7), as one JSON and one Markdown table.

``bash bench/gpu_check.sh [--out DIR]`` on a machine with one CUDA GPU, in under 8 minutes:

1. ``environment``: torch, device, Triton, commit;
2. ``cuda_tests``: ``pytest -m cuda tests`` (every test marked ``cuda``);
3. ``copy_bandwidth``: the device's copy rate (``empty_like(x).copy_(x)`` of 1 GiB, best of
   20; bytes read + written per second), the yardstick for the kernels;
4. ``kernels``: ``bench/test_kernels_bench.py``'s CUDA cases (pytest-benchmark), each one's
   achieved GB/s and its fraction of the copy rate;
5. ``main_command``: ``python -m esper.train --envs 64 --compile`` (``--rounds``, default 1);
6. ``throughput``: one full env epoch (train + counterfactual validation) at N in {8, 64, 256},
   batched (every blueprint masked), planned (group-by-blueprint) and a Python loop over N
   ``nn.Module`` hosts (:mod:`workloads`), plus the compiled engine at N=64 (its first call,
   compilation included, reported apart; it gets what is left of the budget).

Each stage runs in its own subprocess under a share of a fixed time budget (a stage that runs
out is recorded as ``timeout`` and the next one starts), so one failure never loses the other
figures. ``--dry-run`` runs every stage on the CPU at tiny sizes (< 2 minutes) to check the
script itself; ``tests/test_gpu_check.py`` does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The main command runs before the throughput grid: on the H200 (2026-11-28) it took 180 s with
# its compile, and the compiled group-by-blueprint case, last in the grid, did not finish its
# first call (cold compile) in 175 s; what is left of the budget goes to it.
STAGES = ("environment", "cuda_tests", "copy_bandwidth", "kernels", "main_command", "throughput")
# Seconds each stage may take on the GPU (caps; the budget bounds them together, under 8 minutes).
CAPS = {"environment": 30, "cuda_tests": 90, "copy_bandwidth": 20, "kernels": 60,  # kernels: 2 inductor compiles
        "main_command": 210, "throughput": 400}  # fmt: skip
BUDGET_S = 470.0
IMPLS = ("loop", "batched", "planned", "compiled")  # the throughput stage's implementations
# The dry run's tiny main command: the `ppo` preset shrunk (settings the tests' tiny configs use).
DRY_CONFIG = {
    "task": {"train_size": 64, "val_size": 32, "test_size": 32, "image_size": 8},
    "kasmina": {"batch_size": 32, "val_batch_size": 32},
    "ppo": {"minibatch_envs": 2, "epochs": 1, "hidden_size": 16, "lstm_hidden_size": 16},
}


def _sizes(dry: bool) -> dict[str, Any]:
    """Everything the stages size, for the GPU run or the CPU dry run (``ESPER_GPU_CHECK_ENVS``
    / ``_IMPLS`` narrow the throughput grid: ``--envs`` / ``--impls`` set them for the stages)."""
    sizes = _default_sizes(dry)
    if os.environ.get("ESPER_GPU_CHECK_ENVS"):
        sizes["envs"] = tuple(int(n) for n in os.environ["ESPER_GPU_CHECK_ENVS"].split(","))
    sizes["impls"] = tuple(os.environ.get("ESPER_GPU_CHECK_IMPLS", ",".join(IMPLS)).split(","))
    return sizes


def _default_sizes(dry: bool) -> dict[str, Any]:
    if dry:
        return {"device": "cpu", "copy_mib": 16, "copy_repeats": 5, "envs": (2, 4), "compiled_at": None,
                "repeats": 1, "workload": {"train_size": 32, "val_size": 32, "batch_size": 16, "val_batch_size": 32}}
    return {"device": "cuda", "copy_mib": 1024, "copy_repeats": 20, "envs": (8, 64, 256), "compiled_at": 64,
            "repeats": 3, "workload": {}}  # fmt: skip


def _run(cmd: list[str], log: Path, timeout: float) -> int | None:
    """Run ``cmd`` from the repository root, output in ``log``: its exit status, or None when
    it ran out of time (then its whole process group, compile workers included, is killed)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _save(out: Path, name: str, result: dict[str, Any]) -> None:
    """A stage's result so far (stages save as they go: a timeout keeps what was measured)."""
    (out / "stages" / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))


# ----------------------------------------------------------------------------- stages
def stage_environment(out: Path, dry: bool, cap: float) -> dict[str, Any]:
    import torch

    import esper_kernels

    cuda = torch.cuda.is_available()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()  # fmt: skip
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "triton": esper_kernels.HAS_TRITON,
        "commit": commit or None,
    }


def stage_cuda_tests(out: Path, dry: bool, cap: float) -> dict[str, Any]:
    """``pytest -m cuda tests``: on the CPU (dry run) they are collected and skipped."""
    xml = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests", f"--junitxml={xml}"]
    rc = _run(cmd, out / "cuda_tests.log", cap)
    if rc is None or not xml.exists():
        return {"command": " ".join(cmd[1:]), "exit_code": rc, "ok": False,
                "tail": (out / "cuda_tests.log").read_text().splitlines()[-15:]}  # fmt: skip
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"command": " ".join(cmd[1:]), "exit_code": rc, **counts, "failed": failed, "ok": rc == 0}


def copy_bandwidth(device: str, mib: int, repeats: int) -> dict[str, Any]:
    """Best and median ``dst.copy_(src)`` rate over ``repeats``: bytes read + written per second."""
    import torch

    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    times.sort()
    return {"bytes": moved, "best_gb_per_s": moved / times[0] / 1e9,
            "median_gb_per_s": moved / times[len(times) // 2] / 1e9}  # fmt: skip


def stage_copy_bandwidth(out: Path, dry: bool, cap: float) -> dict[str, Any]:
    s = _sizes(dry)
    return {"device": s["device"], **copy_bandwidth(s["device"], s["copy_mib"], s["copy_repeats"])}


def stage_kernels(out: Path, dry: bool, cap: float) -> dict[str, Any]:
    """The kernel benchmarks' cases on this device, with each one's achieved rate."""
    device = _sizes(dry)["device"]
    report = out / "kernels_bench.json"
    timing = ["--benchmark-max-time=0.02", "--benchmark-min-rounds=1", "--benchmark-warmup=off"] if dry else [
        "--benchmark-max-time=0.5"]  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "bench/test_kernels_bench.py", "--benchmark-only", "-q",
           "-p", "no:cacheprovider", "-k", device, f"--benchmark-json={report}", *timing]  # fmt: skip
    rc = _run(cmd, out / "kernels.log", cap)
    cases = []
    for b in json.loads(report.read_text())["benchmarks"] if report.exists() else []:
        rate = b.get("extra_info", {}).get("bytes_per_s")
        cases.append({"name": b["name"], "group": b["group"], "mean_s": b["stats"]["mean"],
                      "gb_per_s": rate / 1e9 if rate else None})  # fmt: skip
    return {"command": " ".join(cmd[1:]), "exit_code": rc, "device": device, "cases": cases, "ok": rc == 0 and bool(cases)}


def _time_epochs(make: Callable[[], Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of an epoch after one warm-up call (whose seconds are kept apart)."""
    from workloads import median_time, sync

    t0 = time.perf_counter()
    fn = make()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    return {"first_call_s": first, "seconds": median_time(fn, repeats, device)}


def stage_throughput(out: Path, dry: bool, cap: float) -> dict[str, Any]:
    """Loop, batched and planned epochs at each N, then the compiled engine at one N (last:
    its compilation is the slowest part; everything measured before a timeout is kept)."""
    sys.path.insert(0, str(HERE))
    from workloads import Workload, batched_epoch, loop_epoch, planned, planned_epoch, seeded_batch

    s = _sizes(dry)
    device, work = s["device"], Workload(**s["workload"])
    task = work.task(device)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"device": device, "workload": work.__dict__, "rows": rows}
    makers: dict[str, Callable[[int], Callable[[], object]]] = {
        "loop": lambda n: loop_epoch(seeded_batch(task, n, work.config())),
        "batched": lambda n: batched_epoch(seeded_batch(task, n, work.config())),
        "planned": lambda n: planned_epoch(planned(seeded_batch(task, n, work.config()))),
        "compiled": lambda n: planned_epoch(planned(seeded_batch(task, n, work.config(compile=True)))),
    }
    jobs = [(n, impl) for n in s["envs"] for impl in ("loop", "batched", "planned") if impl in s["impls"]]
    jobs += [(s["compiled_at"], "compiled")] if s["compiled_at"] in s["envs"] and "compiled" in s["impls"] else []
    for n, impl in jobs:
        row = next((r for r in rows if r["n"] == n), None)
        if row is None:
            rows.append(row := {"n": n})
        repeats = 1 if impl == "loop" and n >= 256 else s["repeats"]
        try:
            t = _time_epochs(lambda n=n, impl=impl: makers[impl](n), repeats, device)
        except Exception as err:  # one configuration failing keeps the others' figures
            row[impl] = {"error": f"{type(err).__name__}: {err}"[:500]}
            result["ok"] = False
            _save(out, "throughput", result)
            continue
        row[impl] = {**t, "env_epochs_per_s": n / t["seconds"]}
        if impl != "loop" and "seconds" in row.get("loop", {}):
            row[impl]["speedup_vs_loop"] = row["loop"]["seconds"] / t["seconds"]
        _save(out, "throughput", result)
    return result


_ROUND = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s+(.*)$")


def stage_main_command(out: Path, dry: bool, cap: float, rounds: int = 1) -> dict[str, Any]:
    """``python -m esper.train --envs 64 --compile``; the dry run: 2 envs, 2 epochs, CPU, eager."""
    run_dir = out / "train"
    if dry:
        config = out / "dry_config.json"
        config.write_text(json.dumps(DRY_CONFIG))
        flags = ["--envs", "2", "--rounds", "1", "--episode-length", "2", "--device", "cpu", "--config", str(config)]
    else:
        flags = ["--envs", "64", "--compile", "--rounds", str(rounds)]
    cmd = [sys.executable, "-m", "esper.train", *flags, "--run-dir", str(run_dir), "--backends", "console"]
    log = out / "main_command.log"
    t0 = time.perf_counter()
    rc = _run(cmd, log, cap)
    wall = time.perf_counter() - t0
    lines = log.read_text().splitlines()
    rounds_seen = [{"elapsed_s": float(m.group(1)), "line": m.group(2)} for m in map(_ROUND.match, lines) if m]
    compile_lines = [ln.strip() for ln in lines if "compil" in ln.lower() and "compile=" not in ln]
    return {"command": "python " + " ".join(cmd[1:]), "exit_code": rc, "wall_s": wall, "rounds": rounds_seen,
            "compile_lines": compile_lines[-5:], "tail": lines[-15:], "ok": rc == 0 and bool(rounds_seen)}  # fmt: skip


STAGE_FNS: dict[str, Callable[..., dict[str, Any]]] = {
    "environment": stage_environment, "cuda_tests": stage_cuda_tests, "copy_bandwidth": stage_copy_bandwidth,
    "kernels": stage_kernels, "throughput": stage_throughput, "main_command": stage_main_command,
}  # fmt: skip


# ----------------------------------------------------------------------------- report
def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    """The whole check as Markdown tables."""
    st = res["stages"]
    env = st.get("environment", {})
    lines = [f"# GPU check{' (dry run, CPU)' if res['dry_run'] else ''}", "",
             f"{env.get('device_name', '?')}, torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, "
             f"commit {env.get('commit', '?')}, {res['started']}, {res['wall_s']:.0f} s in all.", "",
             "| stage | status | seconds |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {st[name]['status']} | {st[name]['seconds']:.1f} |" for name in STAGES if name in st]
    t = st.get("cuda_tests", {})
    if "tests" in t:
        lines += ["", f"**CUDA tests** (`{t['command']}`): {t['passed']} passed, {t['failures'] + t['errors']} "
                  f"failed, {t['skipped']} skipped."] + [f"- failed: `{f}`" for f in t["failed"]]  # fmt: skip
    copy = st.get("copy_bandwidth", {}).get("best_gb_per_s")
    if copy is not None:
        lines += ["", f"**Copy bandwidth**: {copy:.1f} GB/s (best; bytes read + written per second)."]
    if st.get("kernels", {}).get("cases"):
        lines += ["", "| kernel case | mean ms | GB/s | of copy |", "|---|---|---|---|"]
        for c in st["kernels"]["cases"]:
            frac = c["gb_per_s"] / copy if c["gb_per_s"] and copy else None
            lines.append(f"| {c['name']} | {c['mean_s'] * 1e3:.3f} | {_fmt(c['gb_per_s'], 1)} | "
                         f"{'—' if frac is None else f'{frac:.0%}'} |")  # fmt: skip
    if st.get("throughput", {}).get("rows"):
        lines += ["", "| N | loop env-epochs/s | batched | planned | compiled | batched × | planned × | compiled × | "
                  "compiled first call s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in st["throughput"]["rows"]:
            def get(impl: str, key: str, r: dict = r) -> float | None:
                return r.get(impl, {}).get(key)
            lines.append(f"| {r['n']} | " + " | ".join(
                [_fmt(get(i, "env_epochs_per_s")) for i in ("loop", "batched", "planned", "compiled")]
                + [_fmt(get(i, "speedup_vs_loop")) for i in ("batched", "planned", "compiled")]
                + [_fmt(get("compiled", "first_call_s"), 1)]) + " |")  # fmt: skip
        lines += [f"- N={r['n']} {impl}: {v['error']}" for r in st["throughput"]["rows"]
                  for impl, v in r.items() if isinstance(v, dict) and "error" in v]  # fmt: skip
    m = st.get("main_command", {})
    if "command" in m:
        lines += ["", f"**Main command** `{m['command']}`: exit {m['exit_code']}, {m['wall_s']:.1f} s wall."]
        lines += [f"- {r['elapsed_s']:.1f} s: {r['line']}" for r in m["rounds"]]
        lines += [f"- {ln}" for ln in m["compile_lines"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver
def run_stage(name: str, out: Path, dry: bool, cap: float, rounds: int) -> None:
    """Child process: one stage, its result in ``out/stages/<name>.json``. Commands it runs
    get ``cap`` less a margin, so it still records their logs when they run out of time."""
    kwargs = {"rounds": rounds} if name == "main_command" else {}
    _save(out, name, STAGE_FNS[name](out, dry, max(cap - 15.0, 5.0), **kwargs))


def check(out: Path, dry: bool, rounds: int, budget: float, stages: tuple[str, ...] = STAGES,
          caps: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``stages`` (default all), each in its own subprocess, within ``budget`` seconds;
    ``caps`` overrides stages' own limits. The merged results."""
    caps = CAPS | (caps or {})
    (out / "stages").mkdir(parents=True, exist_ok=True)
    for stale in [*(out / "stages").glob("*.json"), out / "cuda_tests.xml", out / "kernels_bench.json"]:
        stale.unlink(missing_ok=True)  # a stage that fails must not show an earlier run's figures
    start = time.monotonic()
    res: dict[str, Any] = {"dry_run": dry, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                           "budget_s": budget, "stages": {}}  # fmt: skip
    for name in (n for n in STAGES if n in stages):
        left = budget - (time.monotonic() - start)
        cap = min(caps[name], left)
        entry: dict[str, Any] = {"status": "skipped", "seconds": 0.0}
        if cap >= 5:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out),
                   "--stage-cap", str(cap), "--rounds", str(rounds), *(["--dry-run"] if dry else [])]  # fmt: skip
            t0 = time.monotonic()
            rc = _run(cmd, out / "stages" / f"{name}.log", cap)
            entry["status"] = f"timeout ({cap:.0f} s)" if rc is None else "ok" if rc == 0 else f"failed (exit {rc})"
            entry["seconds"] = time.monotonic() - t0
            path = out / "stages" / f"{name}.json"
            if path.exists():
                entry |= json.loads(path.read_text())
                if entry["status"] == "ok" and entry.get("ok") is False:
                    entry["status"] = "failed"
        res["stages"][name] = entry
    res["wall_s"] = time.monotonic() - start
    res["ok"] = all(s["status"] == "ok" for s in res["stages"].values())
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(res))
    return res


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; allowed: {', '.join(allowed)}")
    return names


def _stage_list(text: str) -> tuple[str, ...]:
    return _choices(text, STAGES, "stage")


def _impl_list(text: str) -> tuple[str, ...]:
    return _choices(text, IMPLS, "implementation")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated env counts, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"env counts must be >= 1, got {text!r}")
    return values


def _cap(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    if not sep or name not in STAGES:
        raise argparse.ArgumentTypeError(f"expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}, got {text!r}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {seconds!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (checks the script)")
    p.add_argument("--rounds", type=int, default=1, help="PPO rounds of the main command")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages together")
    p.add_argument("--stages", type=_stage_list, default=STAGES,
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--cap", dest="caps", type=_cap, action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time limit (repeatable)")
    p.add_argument("--envs", type=_int_list, help="throughput stage: env counts (default 8,64,256)")
    p.add_argument("--impls", type=_impl_list, help=f"throughput stage: subset of {','.join(IMPLS)}")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage
    p.add_argument("--stage-cap", type=float, default=60.0, help=argparse.SUPPRESS)  # internal: its seconds
    args = p.parse_args(argv)
    if args.envs:
        os.environ["ESPER_GPU_CHECK_ENVS"] = ",".join(map(str, args.envs))
    if args.impls:
        os.environ["ESPER_GPU_CHECK_IMPLS"] = ",".join(args.impls)
    args.out = args.out.resolve()
    if args.stage:
        run_stage(args.stage, args.out, args.dry_run, args.stage_cap, args.rounds)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device (gpu_check); run on a GPU machine, or --dry-run to check the script",
                  file=sys.stderr)  # fmt: skip
            return 2
    res = check(args.out, args.dry_run, args.rounds, args.budget, args.stages, dict(args.caps))
    print((args.out / "gpu_check.md").read_text())
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
