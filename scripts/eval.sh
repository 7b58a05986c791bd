#!/usr/bin/env bash
# Evaluate a pruned model with and without token merging (the reference's ToMe settings by default).
# Usage: IMAGENET=/data/imagenet bash scripts/eval.sh out/deit_base_40/best [R] [START_IDX]
set -euo pipefail
: "${IMAGENET:?set IMAGENET to a folder with train/ and val/}"
CKPT=${1:?checkpoint directory}; R=${2:-24}; START=${3:-1}
python main_lambda.py --eval --checkpoint "$CKPT" --data-set folder --data-path "$IMAGENET" \
  --batch-size 256 --tome-r "$R" --tome-start-idx "$START"
