"""A markdown table of controllers over held-out task seeds, from ``esper.evaluate --json`` files.

Usage: ``python bench/policy_table.py DIR [LABEL=SPEC ...]``: one row per policy of
``DIR/task*.json`` (test accuracy mean ± std over hosts per task seed, their mean, and parameters
added); ``LABEL=SPEC`` names a policy spec (e.g. ``BC=ppo=runs/offline/bc.pt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(root: Path, labels: dict[str, str]) -> list[str]:
    runs = sorted(root.glob("task*.json"))
    if not runs:
        raise SystemExit(f"no task*.json in {root}")
    data = [json.loads(p.read_text()) for p in runs]
    seeds = [d["task_seed"] for d in data]
    hosts = len(next(iter(data[0]["results"].values()))["per_env"]["test_acc"])
    out = ["| controller | " + " | ".join(f"task seed {s}" for s in seeds) + " | mean | params added |",
           "|---" * (len(seeds) + 3) + "|"]
    for spec in data[0]["results"]:
        rows = [d["results"].get(spec) for d in data]
        if any(r is None for r in rows):
            continue
        accs = [r["test_acc"]["mean"] for r in rows]
        params = sum(r["params_added"]["mean"] for r in rows) / len(rows)
        cells = " | ".join(f"{r['test_acc']['mean']:.2f} ± {r['test_acc']['std']:.2f}" for r in rows)
        out.append(f"| {labels.get(spec, spec)} | {cells} | {sum(accs) / len(accs):.2f} | {params:.0f} |")
    out.append(f"\n{hosts} hosts per task seed, host seed {data[0]['host_seed']}, test split, mean ± std over hosts.")
    return out


def main(argv: list[str]) -> int:
    labels = {spec: label for spec, label in ((a.split("=", 1)[1], a.split("=", 1)[0]) for a in argv[1:])}
    print("\n".join(table(Path(argv[0]), labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
