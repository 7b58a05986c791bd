#!/usr/bin/env bash
# Reference-style speed comparison: DeiT-T/S/B dense vs the reference's attention-removal sets vs
# those plus ToMe (the reference's r and start index), random input, batch 256, warm-up 10 +
# 40 timed iterations (x3 repeats), synchronised; eager and torch.compile; one process per mode,
# so every configuration lands in one table.
#
#   bash scripts/bench.sh                                # GPU defaults: cuda, bf16, batch 256
#   DEVICE=cpu PRECISION=fp32 BATCH=8 bash scripts/bench.sh   # a CPU smoke run (slow for DeiT-B)
#   MLP=1 bash scripts/bench.sh                          # append the MLP families to the table
#   TRAIN=1 bash scripts/bench.sh                        # also training-step images/s
#
# Random weights are enough for speed, MACs and memory. To benchmark trained shrunk models, put
# "checkpoint=out/run/best" on a line of the model list (the layers are then already gone; use
# compare=dense) or pass --checkpoint with a single --model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
BATCH=${BATCH:-256}
OUT=${OUT:-out/bench}
COMPILE_MODES=${COMPILE_MODES:-"eager compile"}
MLP=${MLP:-0}
TRAIN=${TRAIN:-0}
mkdir -p "$OUT"

# The reference's removal sets (DeiT-B 40%/50%, DeiT-S/T 25%/30%) and its ToMe settings
# (r, start index counted over attention-bearing blocks) from its README.
LIST="$OUT/models.txt"
cat > "$LIST" <<'EOF'
deit_tiny_patch16_224   remove=0,2,4         tome_r=19 tome_start=1 compare=dense,pruned,pruned+tome
deit_tiny_patch16_224   remove=0,2,4,6       tome_r=14 tome_start=1 compare=pruned,pruned+tome
deit_small_patch16_224  remove=0,2,4         tome_r=22 tome_start=1 compare=dense,pruned,pruned+tome
deit_small_patch16_224  remove=0,2,4,6       tome_r=19 tome_start=1 compare=pruned,pruned+tome
deit_base_patch16_224   remove=0,1,3,4,6     tome_r=24 tome_start=1 compare=dense,pruned,pruned+tome
deit_base_patch16_224   remove=0,1,3,4,6,9   tome_r=14 tome_start=0 compare=pruned,pruned+tome
EOF
if [[ "$MLP" == "1" ]]; then
  cat >> "$LIST" <<'EOF'
mixer_s16_224
mixer_b16_224
resmlp_12_224
resmlp_24_224
gmlp_s16_224
ffvit_tiny_patch16_224
msmlp_tiny_patch4_shift5_224
EOF
fi

EXTRA=()
[[ "$TRAIN" == "1" ]] && EXTRA+=(--train)

for mode in $COMPILE_MODES; do
  FLAGS=()
  [[ "$mode" == "compile" ]] && FLAGS+=(--compile)
  tag="${DEVICE%%:*}_${PRECISION}_b${BATCH}_${mode}"
  echo "== $tag" >&2
  "$PYTHON" benchmark.py --model "$LIST" --device "$DEVICE" --precision "$PRECISION" \
      --batch-size "$BATCH" ${FLAGS[@]+"${FLAGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} "$@" \
      --json "$OUT/$tag.json" --csv "$OUT/$tag.csv" --plot "$OUT/$tag.png" | tee "$OUT/$tag.md"
done
