#!/usr/bin/env bash
# The README's offline-learning table (issue 28): behaviour cloning, IQL and CQL trained on the
# same episode pack, then each used as the start of a short PPO run, all scored on held-out task
# seeds 1 and 2 (16 hosts, host seed 7) beside the heuristic and the shipped controller.
# The pack: one episode of 16 envs each from the heuristic, the fixed schedule and the random
# controller on the `ppo` preset's task seed 0 (offline RL needs actions the teacher did not take).
# Usage: bash bench/offline_table.sh [OUT] [STAGE: offline|ppo|all]   (tables: bench/results/offline/)
set -euo pipefail
OUT=${1:-runs/offline}
STAGE=${2:-all}
R=bench/results/offline
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT" "$R"
run() { echo "+ $*" | tee -a "$R/commands.txt"; "$@"; }
[ -e "$OUT/pack/meta.json" ] || run python -m esper.generate --preset ppo --policies heuristic,fixed,random \
  --episodes 1 --envs 16 --task-seed 0 --seed 300 --backends none --out "$OUT/pack"
for m in bc iql cql; do
  [ -e "$OUT/$m.pt" ] || run python -m esper.train --policy $m --preset ppo --data "$OUT/pack" --save "$OUT/$m.pt" \
    --run-dir "$OUT/$m" > "$R/train_$m.log" 2>&1
done
POL=heuristic,ppo,ppo=$OUT/bc.pt,ppo=$OUT/iql.pt,ppo=$OUT/cql.pt
if [ "$STAGE" != offline ]; then
  for m in bc iql cql; do  # 3 PPO rounds of 16 envs from each offline controller
    [ -e "$OUT/ppo_from_$m.pt" ] || run python -m esper.train --preset ppo --init "$OUT/$m.pt" --envs 16 --rounds 3 \
      --heldout 0 --save "$OUT/ppo_from_$m.pt" --run-dir "$OUT/ppo_from_$m" --backends none > "$R/ppo_from_$m.log" 2>&1
  done
  POL=$POL,ppo=$OUT/ppo_from_bc.pt,ppo=$OUT/ppo_from_iql.pt,ppo=$OUT/ppo_from_cql.pt
fi
for t in 1 2; do
  run python -m esper.evaluate --preset ppo --policies "$POL" --envs 16 --seed 7 --task-seed $t --backends none \
    --json "$R/task$t.json" > "$R/task$t.txt" 2>&1
done
