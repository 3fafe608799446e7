#!/usr/bin/env bash
# Every GPU figure from one short loan (issue 14 item 7): the CUDA tests, kernel GB/s against
# the device's copy bandwidth, batched vs loop at N in {8, 64, 256}, and the main command,
# in under 8 minutes on one GPU; one JSON and one Markdown table in the output directory.
#
#   bash bench/gpu_check.sh [--out DIR] [--rounds R] [--budget SECONDS]
#   bash bench/gpu_check.sh --dry-run [--out DIR]   # the same stages on the CPU, tiny (< 2 min)
#
# Default output: bench/results/gpu_check/{gpu_check.json,gpu_check.md} (logs beside them).
# The logic is in bench/gpu_check.py; PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.inductor-cache}"
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
