#!/usr/bin/env bash
# Reproduces the shipped Tamiyo controller (esper/simic/controllers/tamiyo.pt) from scratch, on
# the `ppo` preset: a teacher's episodes on task seed 0 (the tuning task) -> behaviour cloning
# -> PPO, still on task seed 0; then the held-out evaluation on task seeds 1, 2 and 3 (test split).
# Logs, checkpoints and evaluation JSON go to $OUT; every command is appended to $OUT/commands.txt.
# Usage: bash bench/train_controller.sh [OUT] [PPO_ROUNDS] [PPO_ENVS] [TEACHER] [CONFIG]
# CONFIG: a TrainingConfig file applied over the preset for the pack, the clone and PPO
# (e.g. bench/results/observation/diagnostic.yaml: diagnostic observations).
set -euo pipefail
OUT=${1:-runs/controller}
ROUNDS=${2:-16}
ENVS=${3:-12}
TEACHER=${4:-fixed}
CONFIG=${5:-}
CFG=()
[ -n "$CONFIG" ] && CFG=(--config "$CONFIG")
mkdir -p "$OUT"
run() { echo "+ $*" | tee -a "$OUT/commands.txt"; "$@"; }
[ -e "$OUT/pack/meta.json" ] || run python -m esper.generate --preset ppo "${CFG[@]}" --policies "$TEACHER" \
  --episodes 1 --envs 16 --task-seed 0 --seed 300 --backends none --out "$OUT/pack"
[ -e "$OUT/bc.pt" ] || run python -m esper.train --policy bc --preset ppo "${CFG[@]}" --data "$OUT/pack" \
  --save "$OUT/bc.pt" --backends none --run-dir "$OUT/bc"
if [ -e "$OUT/ppo.pt" ]; then
  run python -m esper.train --preset ppo "${CFG[@]}" --resume "$OUT/ppo.pt" --rounds "$ROUNDS" --envs "$ENVS" \
    --task-seed 0 --seed 200 --save "$OUT/ppo.pt" --backends jsonl --run-dir "$OUT/ppo"
else
  run python -m esper.train --preset ppo "${CFG[@]}" --init "$OUT/bc.pt" --rounds "$ROUNDS" --envs "$ENVS" \
    --task-seed 0 --seed 200 --save "$OUT/ppo.pt" --backends jsonl --run-dir "$OUT/ppo"
fi
# Each learned controller is evaluated on the observation it was trained on (its checkpoint's
# features.observe); the host setting is the preset's.
for t in 1 2 3; do
  run python -m esper.evaluate --preset ppo \
    --policies static,heuristic,ppo="$OUT/ppo.pt",ppo="$OUT/bc.pt" \
    --envs 16 --task-seed "$t" --seed 7 --backends none --json "$OUT/eval_task$t.json"
done
