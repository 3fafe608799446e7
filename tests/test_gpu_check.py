"""Issue 14 item 7: ``bench/gpu_check.sh --dry-run`` runs every stage on the CPU and writes
the JSON and Markdown a GPU loan would (the figures themselves need the GPU).

Run with ``pytest -m slow tests/test_gpu_check.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "cuda_tests", "copy_bandwidth", "kernels", "main_command", "throughput")


@pytest.mark.slow  # ~70 s on a 2-core CPU: CI runs it with the other slow tests
def test_gpu_check_dry_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    st = res["stages"]
    assert res["dry_run"] is True and res["ok"] is True
    assert [s for s in STAGES if st[s]["status"] == "ok"] == list(STAGES), {s: st[s]["status"] for s in STAGES}
    assert res["wall_s"] < 120 * 2  # the dry run is sized for < 2 min; slack for a loaded machine
    assert st["environment"]["torch"] and "triton" in st["environment"]
    tests = st["cuda_tests"]
    assert tests["tests"] >= 3 and tests["failures"] == tests["errors"] == 0  # collected (skipped on a CPU)
    assert st["copy_bandwidth"]["best_gb_per_s"] > 0
    cases = st["kernels"]["cases"]
    assert {c["group"] for c in cases} >= {"blend-forward-cpu", "grad-stats-cpu"}
    assert all(c["gb_per_s"] > 0 for c in cases)
    rows = st["throughput"]["rows"]
    assert [r["n"] for r in rows] == [2, 4]
    for r in rows:
        for impl in ("loop", "batched", "planned"):
            assert r[impl]["env_epochs_per_s"] > 0
        assert r["batched"]["speedup_vs_loop"] > 0 and r["planned"]["speedup_vs_loop"] > 0
    main = st["main_command"]
    assert main["exit_code"] == 0 and len(main["rounds"]) == 1
    assert "esper.train --envs 2" in main["command"]
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (dry run, CPU)")
    for header in ("| stage | status | seconds |", "| kernel case | mean ms | GB/s | of copy |",
                   "| N | loop env-epochs/s |", "**Copy bandwidth**", "**Main command**"):  # fmt: skip
        assert header in md, header
    assert md.count("| ok |") == len(STAGES)
    assert "| 4 | " in md and "test_grad_stats[cpu-esper]" in md


def test_gpu_check_runs_a_chosen_subset_with_its_own_limits(tmp_path: Path) -> None:
    """A second, shorter loan reruns only what the first one missed: ``--stages``, ``--envs``,
    ``--impls`` and ``--cap`` narrow the check (the skipped stages are absent, not failed)."""
    out = tmp_path / "subset"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
           "--stages", "environment,throughput", "--envs", "2", "--impls", "loop,planned",
           "--cap", "throughput=90"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert list(res["stages"]) == ["environment", "throughput"] and res["ok"] is True
    (row,) = res["stages"]["throughput"]["rows"]
    assert row["n"] == 2 and set(row) == {"n", "loop", "planned"}
    assert row["planned"]["speedup_vs_loop"] > 0


@pytest.mark.parametrize(
    ("flag", "message"),
    [(["--stages", "kernels,bogus"], "unknown stage ['bogus']; allowed: environment"),
     (["--cap", "main=10"], "expected STAGE=SECONDS with STAGE one of"),
     (["--cap", "kernels=soon"], "seconds must be a number"),
     (["--envs", "8,0"], "env counts must be >= 1"),
     (["--impls", "fast"], "unknown implementation ['fast']; allowed: loop")],
)  # fmt: skip
def test_gpu_check_refuses_bad_options_by_name(tmp_path: Path, flag: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run",
                           "--out", str(tmp_path), *flag], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
