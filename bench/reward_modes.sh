#!/usr/bin/env bash
# The README's reward-mode table (issue 28): what each reward family teaches PPO. The same start
# (the behaviour clone of bench/offline_table.sh, run it first), the same 3 PPO rounds of 16
# envs on the `ppo` preset's task seed 0, one run per reward.mode; then each controller on the
# held-out task seeds 1 and 2 (16 hosts, host seed 7). The shaped run is offline_table.sh's
# ppo_from_bc. Usage: bash bench/reward_modes.sh [OUT]   (tables: bench/results/reward_modes/)
set -euo pipefail
OUT=${1:-runs/offline}
R=bench/results/reward_modes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$R"
run() { echo "+ $*" | tee -a "$R/commands.txt"; "$@"; }
for mode in simplified sparse; do
  [ -e "$OUT/ppo_$mode.pt" ] || run python -m esper.train --preset ppo --init "$OUT/bc.pt" --envs 16 --rounds 3 \
    --reward-mode $mode --heldout 0 --save "$OUT/ppo_$mode.pt" --run-dir "$OUT/ppo_$mode" --backends none \
    > "$R/ppo_$mode.log" 2>&1
done
POL=ppo=$OUT/ppo_from_bc.pt,ppo=$OUT/ppo_simplified.pt,ppo=$OUT/ppo_sparse.pt
for t in 1 2; do
  run python -m esper.evaluate --preset ppo --policies "$POL" --envs 16 --seed 7 --task-seed $t --backends none \
    --json "$R/task$t.json" > "$R/task$t.txt" 2>&1
done
