#!/usr/bin/env bash
# The README's real-data tables: static, heuristic and a controller on real data nobody here
# designed (python bench/real_data.py writes it), plus a static capacity-reference host.
# Task seed 0 / host seed 0 was the only setting looked at while choosing the presets; these
# are task seeds (split carvings) 1 and 2 with host seed 7, 8 hosts each.
# Usage: bash bench/real_results.sh [CONTROLLER] [STAGE: base|ppo|all] [DATASETS...]
# (datasets: digits mnist5k english code; default all four)
set -euo pipefail
CTRL=${1:-ppo}
STAGE=${2:-all}
shift $(( $# > 2 ? 2 : $# ))
DATASETS=("$@")
[ ${#DATASETS[@]} -gt 0 ] || DATASETS=(digits mnist5k english code)
R=bench/results/real
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ev() { local out=$1; shift; echo "+ python -m esper.evaluate $*" | tee -a "$R/commands.txt";
       python -m esper.evaluate "$@" --envs 8 --seed 7 --backends none --json "$R/$out.json" > "$R/$out.txt" 2>&1; }
preset_of() { case $1 in digits|mnist5k) echo images;; *) echo text;; esac; }
ref_of() { case $1 in digits|mnist5k) echo wide;; *) echo deep;; esac; }
for t in 1 2; do
  for d in "${DATASETS[@]}"; do
    p=$(preset_of "$d"); ref=$(ref_of "$d")
    if [ "$STAGE" != ppo ]; then
      [ -e "$R/${d}_task${t}_base.json" ] || ev "${d}_task${t}_base" --preset "$p" --config "$R/$d.yaml" --policies static,heuristic --task-seed $t
      [ -e "$R/${d}_task${t}_${ref}.json" ] || ev "${d}_task${t}_${ref}" --preset "$p" --config "$R/${d}_${ref}.yaml" --policies static --task-seed $t
    fi
    if [ "$STAGE" != base ]; then
      ev "${d}_task${t}_ppo" --preset "$p" --config "$R/$d.yaml" --policies "$CTRL" --task-seed $t
    fi
  done
done
