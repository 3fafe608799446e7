"""Markdown tables for the README's learned-controller section, read from the run's files.

``python bench/controller_report.py RUN_DIR`` reads ``RUN_DIR/eval_task*.json`` (written by
``esper.evaluate``) and the PPO checkpoint's per-round history (``RUN_DIR/ppo.pt``), so the
README's numbers are regenerated from what ``bench/train_controller.sh`` wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def eval_table(run: Path) -> str:
    rows = ["| task seed | policy | test acc | params added | fossilized | culled |",
            "|---|---|---|---|---|---|"]
    for path in sorted(run.glob("eval_task*.json")):
        data = json.loads(path.read_text())
        for name, r in data["results"].items():
            label = name.replace(str(run) + "/", "")
            rows.append(f"| {data['task_seed']} | {label} | {r['test_acc']['mean']:.2f} ± {r['test_acc']['std']:.2f} "
                        f"| {r['params_added']['mean']:.0f} | {r['fossilized']['mean']:.2f} | {r['culled']['mean']:.2f} |")
    return "\n".join(rows)


def curve_table(run: Path) -> str:
    ckpt = torch.load(run / "ppo.pt", map_location="cpu", weights_only=False)
    rows = ["| round | test acc (task 0) | fossilized | params added | return | explained var. | op entropy | s |",
            "|---|---|---|---|---|---|---|---|"]
    for h in ckpt["history"]:
        rows.append(f"| {h['round']} | {h['test_acc']:.2f} | {h['fossilized']:.2f} | {h['params_added']:.0f} "
                    f"| {h['mean_return']:+.3f} | {h['explained_variance']:+.2f} | {h['entropy']['op']:.2f} "
                    f"| {h['collect_s'] + h['update_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    print(eval_table(args.run))
    print()
    print(curve_table(args.run))


if __name__ == "__main__":
    main()
