#!/usr/bin/env bash
# The toy run on a CPU, from a fresh clone, in a few minutes:
#   1. install the package into .venv (CPU is enough)
#   2. write a small SYNTHETIC corpus (sentences from a tiny grammar; not real text) and train a
#      512-id tokenizer on it
#   3. pretrain a depth-4 dense GPT on it for 200 steps with scripts.base_train, printing the
#      loss each step and the val bits-per-byte every 50
# Everything is written under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat), in folders of its
# own, so real data, tokenizers and checkpoints there are left alone. A rerun starts over.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
PY=.venv/bin/python

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
DATA_DIR="$NANOCHAT_BASE_DIR/runcpu/synthetic_data"
TOKENIZER_DIR="$NANOCHAT_BASE_DIR/runcpu/tokenizer"
OUT_DIR="$NANOCHAT_BASE_DIR/runcpu/base_checkpoints"

echo "== synthetic corpus (smoke test data, not real text) -> $DATA_DIR"
$PY -m nanochat.dataset --synthetic --data-dir "$DATA_DIR" --num-shards 8 --docs-per-shard 1024

echo "== tokenizer -> $TOKENIZER_DIR"
$PY -m scripts.tok_train --data-dir "$DATA_DIR" --out-dir "$TOKENIZER_DIR" --vocab-size 512 --max-chars 5000000

echo "== base_train -> $OUT_DIR"
rm -rf "$OUT_DIR"  # this script's own checkpoints: a rerun is a fresh run
$PY -m scripts.base_train --device cpu --depth 4 --max-seq-len 256 --device-batch-size 8 \
    --total-batch-size 2048 --num-iterations 200 --eval-every 50 --eval-tokens 8192 \
    --data-dir "$DATA_DIR" --tokenizer-dir "$TOKENIZER_DIR" --out-dir "$OUT_DIR"
echo "== done: checkpoint and tokenizer in $OUT_DIR (load with nanochat.checkpoint_manager.load_model)"
