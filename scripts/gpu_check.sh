#!/usr/bin/env bash
# The GPU path in one command, for any machine with a CUDA GPU (run it whenever one is lent):
#
#   bash scripts/gpu_check.sh                 # writes out/gpu_check/REPORT.md (+ logs, JSON, metrics)
#   QUICK=1 bash scripts/gpu_check.sh         # smaller sizes (a smoke run of every step, ~5 minutes)
#
# Steps (each logged; a failing step is reported and the next one still runs):
#   1. the GPU tests (pytest: CUDA-only tests + the fake-device and dilution suites, on CUDA);
#   2. the DeiT-T and DeiT-S recipes for two short epochs on synthetic data: bf16, EMA, repeated
#      augmentation, Mixup/CutMix, distillation, lambda 1 -> 0 (epoch 0 diluted, epoch 1 attention-free),
#      eager and --compile; seconds per epoch of each phase;
#   3. the same DeiT-S run on 2 GPUs (accelerate launch --multi_gpu) where there are two, and through
#      FSDP2 (configs/accelerate/fsdp.yaml, without EMA) on every GPU there is;
#   4. the layer-selection time of DeiT-B on 1024 synthetic images (transfer entropy, bf16);
#   5. benchmark.py: DeiT-T/S/B dense / the reference's removal sets / + ToMe, batch 256, bf16,
#      eager and torch.compile (scripts/bench.sh).
# The report names the GPU, the driver, torch / timm / accelerate versions, the date and the commands;
# paste it into docs/benchmarks.md. fvcore (benchmark GMACs) is installed from .whl/ when it is
# missing and wheels are there (see the device tool's README); without it step 5 is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
QUICK=${QUICK:-0}
IMAGES=$([[ "$QUICK" == "1" ]] && echo 1024 || echo 5120)
CALIB=$([[ "$QUICK" == "1" ]] && echo 256 || echo 1024)
mkdir -p "$OUT"
REPORT="$OUT/REPORT.md"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch; nothing to check" >&2
  exit 2
fi
if ! "$PYTHON" -c "import fvcore" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
fi
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")

{
  echo "# GPU check, $(date -u +%Y-%m-%d\ %H:%M) UTC"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PYTHON" -c "import torch, timm, accelerate; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, accelerate {accelerate.__version__}')"
  echo "GPUs: $NGPU; command: QUICK=$QUICK bash scripts/gpu_check.sh"
  echo '```'
} > "$REPORT"

status() {  # status NAME RC LOG
  if [[ "$2" == "0" ]]; then echo "- $1: ok" >> "$REPORT"; else
    echo "- $1: FAILED (exit $2), last lines of $3:" >> "$REPORT"; echo '```' >> "$REPORT"
    tail -n 15 "$3" >> "$REPORT"; echo '```' >> "$REPORT"; fi
}

echo -e "\n## Results\n" >> "$REPORT"

# 1. tests that need or exercise CUDA
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_dilution.py tests/test_devices.py -m "not slow" \
  > "$OUT/pytest.log" 2>&1
status "GPU tests (pytest tests/test_dilution.py tests/test_devices.py)" $? "$OUT/pytest.log"

# 2./3. the DeiT recipes, 2 epochs: epoch 0 diluted (lambda 1), epoch 1 attention-free (lambda 0)
RECIPE=(--data-set synthetic --synthetic-images "$IMAGES" --no-pretrained --batch-size 128 --epochs 2
        --dilution-epochs 1 --mixed-precision bf16 --model-ema --repeated-aug --mixup 0.8 --cutmix 1.0
        --distill --drop-path 0.1 --lr 5e-4 --num-workers 8 --no-progress)
recipe() {  # recipe TAG NPROC MODEL LAYERS [extra flags]
  local tag=$1 n=$2 model=$3 layers=$4; shift 4
  local launch=("$PYTHON" -m accelerate.commands.launch --num_machines 1 --dynamo_backend no --mixed_precision bf16)
  if [[ "$n" -gt 1 ]]; then launch+=(--multi_gpu --num_processes "$n"); else launch+=(--num_processes 1); fi
  rm -rf "$OUT/$tag"
  "${launch[@]}" main_lambda.py --model "$model" --remove-layers "$layers" "${RECIPE[@]}" "$@" \
    --output-dir "$OUT/$tag" > "$OUT/$tag.log" 2>&1
  local rc=$?
  status "recipe $tag ($model, remove $layers, $n GPU(s) $*)" $rc "$OUT/$tag.log"
  if [[ $rc == 0 ]]; then
    "$PYTHON" - "$OUT/$tag" >> "$REPORT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
s = json.loads((out / "summary.json").read_text())
cells = ", ".join(f"epoch {r['epoch']} (lambda {r['lambda']}): {r['seconds']:.1f} s" for r in rows)
ratio = rows[0]["seconds"] / rows[1]["seconds"] if len(rows) > 1 and rows[1]["seconds"] else float("nan")
print(f"  - {cells}; diluted / attention-free epoch time = {ratio:.2f}; params {s['params_dense']:,} -> "
      f"{s['params_deploy']:,}; best/ reloads: {s['best_acc_reloaded'] is not None}")
PY
  fi
}
recipe deit_tiny 1 deit_tiny_patch16_224 0,2,4
recipe deit_tiny_compile 1 deit_tiny_patch16_224 0,2,4 --compile
recipe deit_small 1 deit_small_patch16_224 0,2,4
recipe deit_small_compile 1 deit_small_patch16_224 0,2,4 --compile
if [[ "$NGPU" -ge 2 ]]; then recipe deit_small_2gpu 2 deit_small_patch16_224 0,2,4;
else echo "- 2-GPU run: skipped (1 GPU)" >> "$REPORT"; fi

# 3b. FSDP2 through Accelerate (configs/accelerate/fsdp.yaml) on the GPUs there are: no EMA under FSDP
rm -rf "$OUT/deit_small_fsdp"
"$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes "$NGPU" \
  main_lambda.py --model deit_small_patch16_224 --remove-layers 0,2,4 \
  $(printf '%s ' "${RECIPE[@]}" | sed 's/--model-ema //') --output-dir "$OUT/deit_small_fsdp" \
  > "$OUT/deit_small_fsdp.log" 2>&1
rc=$?
[[ $rc == 0 && ! -f "$OUT/deit_small_fsdp/best/model.safetensors" ]] && rc=3
status "FSDP2 via configs/accelerate/fsdp.yaml, $NGPU GPU(s), DeiT-S, valid best/" $rc "$OUT/deit_small_fsdp.log"

# 4. selection time, DeiT-B, transfer entropy on synthetic images
start=$(date +%s.%N)
"$PYTHON" -m shrink.select --model deit_base_patch16_224 --random-init --data-set synthetic --device cuda --amp bf16 \
  --calib-images "$CALIB" --ratio 0.4 --criterion transfer_entropy --output-dir "$OUT/select_b" \
  > "$OUT/select_b.log" 2>&1
rc=$?
secs=$("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
status "selection DeiT-B, $CALIB synthetic images: ${secs} s wall (includes start-up)" $rc "$OUT/select_b.log"

# 5. the benchmark table (eager and compiled), the reference's removal sets and ToMe settings
if "$PYTHON" -c "import fvcore" 2>/dev/null; then
  BATCH=$([[ "$QUICK" == "1" ]] && echo 64 || echo 256)
  OUT="$OUT/bench" BATCH=$BATCH DEVICE=cuda PRECISION=bf16 PYTHON="$PYTHON" bash scripts/bench.sh \
    > "$OUT/bench.log" 2>&1
  rc=$?
  status "benchmark.py, batch $BATCH, bf16, eager + compile (scripts/bench.sh)" $rc "$OUT/bench.log"
  for f in "$OUT"/bench/*.md; do [[ -f "$f" ]] && { echo -e "\n### $(basename "$f" .md)\n"; cat "$f"; } >> "$REPORT"; done
else
  echo "- benchmark: skipped (fvcore not installed; carry its wheels in .whl/)" >> "$REPORT"
fi

cat "$REPORT"
grep -q FAILED "$REPORT" && exit 1 || exit 0
