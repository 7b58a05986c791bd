#!/usr/bin/env bash
# DeiT-S and DeiT-T at 25% / 30% removed (the reference runs), 8 GPUs x 256 each, one after the other.
# Usage: IMAGENET=/data/imagenet DEIT_S=/ckpt/deit_small.pth DEIT_T=/ckpt/deit_tiny.pth bash scripts/shrink_small_tiny.sh
set -euo pipefail
: "${IMAGENET:?}" ; : "${DEIT_S:?}" ; : "${DEIT_T:?}"
for run in small_25 small_30; do
  accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml main_lambda.py \
    --config "configs/deit_${run}.yaml" --data-path "$IMAGENET" --finetune "$DEIT_S"
done
for run in tiny_25 tiny_30; do
  accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml main_lambda.py \
    --config "configs/deit_${run}.yaml" --data-path "$IMAGENET" --finetune "$DEIT_T"
done
