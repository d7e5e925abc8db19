#!/usr/bin/env bash
# The whole Adamba pipeline at toy scale on a CPU, from a fresh clone:
#   1. install the package into .venv (CPU is enough)
#   2. python -m tiny_experiment: a synthetic task mix (easy / medium / hard questions), a tokenizer,
#      a dense nanochat GPT pretrained on it, surgery -> phase 1 -> phase 2 -> growth -> phase 3,
#      gate calibration, then evaluation on held-out problems with nanochat.engine
# It prints a results table with the targets (pass/fail) and writes results.json and two plots to
# $NANOCHAT_BASE_DIR/tiny_experiment (default ~/.cache/nanochat/tiny_experiment). A rerun starts over.
# Extra arguments go to tiny_experiment, e.g. `bash runs/runcpu.sh --quick` or `--seed 1`.
set -euo pipefail
cd "$(dirname "$0")/.."

source runs/cpu_venv.sh
cpu_venv  # .venv with CPU torch and this package; PY is its python

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
OUT_DIR="$NANOCHAT_BASE_DIR/tiny_experiment"

echo "== tiny_experiment -> $OUT_DIR"
$PY -m tiny_experiment --out "$OUT_DIR" --overwrite "$@"
echo "== done: $OUT_DIR/results.json, compute_vs_accuracy.png, width_by_block.png; final checkpoint in $OUT_DIR/final"
