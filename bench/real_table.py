"""The README's real-data table, from the JSON that ``bench/real_results.sh`` writes.

Usage: ``python bench/real_table.py [DIR]`` (default ``bench/results/real``): one markdown row per
dataset and task seed: test accuracy mean ± std over the hosts of static, heuristic, the
controller and the static capacity-reference host; on text also test perplexity.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATASETS = {"digits": ("images", "wide"), "mnist5k": ("images", "wide"), "english": ("text", "deep"),
            "code": ("text", "deep")}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())["results"] if path.is_file() else {}


def _cell(r: dict | None, key: str = "test_acc", fmt: str = ".2f") -> str:
    if not r:
        return "–"
    return f"{r[key]['mean']:{fmt}} ± {r[key]['std']:{fmt}}"


def rows(root: Path) -> list[str]:
    out = ["| data (preset) | task seed | hosts | static | heuristic | shipped `ppo` | ppo − heuristic | "
           "capacity ref. (static) | params added (heuristic / ppo) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, (preset, ref) in DATASETS.items():
        for t in (1, 2):
            base = _load(root / f"{name}_task{t}_base.json")
            ppo = _load(root / f"{name}_task{t}_ppo.json")
            cap = _load(root / f"{name}_task{t}_{ref}.json")
            if not base:
                continue
            s, h, p, c = base.get("static"), base.get("heuristic"), next(iter(ppo.values()), None), cap.get("static")
            hosts = len(s["per_env"]["test_acc"]) if s else 0
            diff = f"{p['test_acc']['mean'] - h['test_acc']['mean']:+.2f}" if p and h else "–"
            params = (f"{h['params_added']['mean']:.0f} / {p['params_added']['mean']:.0f}" if p and h else "–")
            out.append(f"| {name} ({preset}) | {t} | {hosts} | {_cell(s)} | {_cell(h)} | {_cell(p)} | {diff} | "
                       f"{_cell(c)} ({ref}) | {params} |")
            if preset == "text":
                out.append(f"| ↳ test perplexity | {t} | | {_cell(s, 'test_perplexity', '.3f')} | "
                           f"{_cell(h, 'test_perplexity', '.3f')} | {_cell(p, 'test_perplexity', '.3f')} | | "
                           f"{_cell(c, 'test_perplexity', '.3f')} | |")
    return out


def main(argv: list[str]) -> int:
    print("\n".join(rows(Path(argv[0] if argv else "bench/results/real"))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
