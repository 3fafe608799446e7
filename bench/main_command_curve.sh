#!/usr/bin/env bash
# The README's per-round held-out curve of the main command: the default start (the shipped
# controller, 3 rounds) and --from-scratch (8 rounds), 64 envs each, eager (the curve does not
# depend on --compile). Logs and the held-out events in bench/results/main_command/; the runs
# themselves (checkpoint, full telemetry) in runs/curve/.
# Usage: bash bench/main_command_curve.sh [shipped|scratch|all]
set -euo pipefail
WHICH=${1:-all}
R=bench/results/main_command
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$R"
if [ "$WHICH" != scratch ]; then
  echo "+ python -m esper.train --envs 64 --run-dir runs/curve/shipped --force" | tee -a "$R/curve_commands.txt"
  python -m esper.train --envs 64 --run-dir runs/curve/shipped --force > "$R/curve_shipped.log" 2>&1
  grep '"kind": "heldout"' runs/curve/shipped/telemetry.jsonl > "$R/curve_shipped_heldout.jsonl"
fi
if [ "$WHICH" != shipped ]; then
  echo "+ python -m esper.train --envs 64 --from-scratch --rounds 8 --run-dir runs/curve/scratch --force" \
    | tee -a "$R/curve_commands.txt"
  python -m esper.train --envs 64 --from-scratch --rounds 8 --run-dir runs/curve/scratch --force \
    > "$R/curve_scratch.log" 2>&1
  grep '"kind": "heldout"' runs/curve/scratch/telemetry.jsonl > "$R/curve_scratch_heldout.jsonl"
fi
