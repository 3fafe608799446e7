#!/usr/bin/env bash
# Reproduces the shipped Tamiyo controller (esper/simic/controllers/tamiyo.pt): the fixed
# schedule's episodes on the synthetic task (task seed 0) -> behaviour cloning -> PPO over the
# mix of settings in bench/controller_mix.yaml (images and sequences, three hosts), a round each
# in turn. No real dataset is used: the controller is scored on real data it never saw
# (README, "Real data"). Logs and checkpoints go to $OUT; commands to $OUT/commands.txt.
# Usage: bash bench/train_controller_mix.sh [OUT] [PPO_ROUNDS] [PPO_ENVS]
set -euo pipefail
OUT=${1:-runs/controller_mix}
ROUNDS=${2:-15}
ENVS=${3:-12}
mkdir -p "$OUT"
run() { echo "+ $*" | tee -a "$OUT/commands.txt"; "$@"; }
[ -e "$OUT/pack/meta.json" ] || run python -m esper.generate --preset ppo --policies fixed \
  --episodes 1 --envs 16 --task-seed 0 --seed 300 --backends none --out "$OUT/pack"
[ -e "$OUT/bc.pt" ] || run python -m esper.train --policy bc --preset ppo --data "$OUT/pack" \
  --save "$OUT/bc.pt"
run python -m esper.train --mix bench/controller_mix.yaml --init "$OUT/bc.pt" --rounds "$ROUNDS" --envs "$ENVS" \
  --seed 200 --save "$OUT/ppo.pt" --force --backends jsonl --run-dir "$OUT/ppo"
