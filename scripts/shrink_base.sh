#!/usr/bin/env bash
# DeiT-B, 40% of the attention layers removed (the reference run), 8 GPUs x 256.
# Usage: IMAGENET=/data/imagenet DEIT_B=/ckpt/deit_base_patch16_224-b5f2ef4d.pth bash scripts/shrink_base.sh [extra flags]
set -euo pipefail
: "${IMAGENET:?set IMAGENET to a folder with train/ and val/}"
: "${DEIT_B:?set DEIT_B to the DeiT-B .pth checkpoint}"
accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml main_lambda.py \
  --config configs/deit_base_40.yaml --data-path "$IMAGENET" --finetune "$DEIT_B" "$@"
