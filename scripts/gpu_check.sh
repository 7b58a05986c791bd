#!/usr/bin/env bash
# The GPU path in one command, for any machine with a CUDA GPU (run it whenever one is lent). It runs
# from a clone as it is: no install needed (PYTHONPATH is the clone; torch, timm, accelerate installed).
#
#   bash scripts/gpu_check.sh                 # writes out/gpu_check/REPORT.md (+ logs, JSON, metrics)
#   QUICK=1 bash scripts/gpu_check.sh         # smaller sizes (a smoke run of every step, ~5 minutes)
#   bash scripts/gpu_check.sh --dry-run       # any machine, on the CPU: every step's set-up and its
#                                             # smallest version, the report skeleton; exit 0 when all
#                                             # of it works (CI runs it: tests/project/test_gpu_check.py)
#   PYTHON=/path/to/python OUT=dir ...        # the interpreter and the output folder
#
# Steps (each logged; a failing step is reported and the next one still runs):
#   1. the GPU tests (pytest: CUDA-only tests + the fake-device and dilution suites, on CUDA);
#   2. the DeiT-T and DeiT-S recipes for two short epochs on synthetic data: bf16, EMA, repeated
#      augmentation, Mixup/CutMix, distillation, lambda 1 -> 0 (epoch 0 diluted, epoch 1 attention-free),
#      eager and --compile; seconds per epoch of each phase;
#   3. the same DeiT-S run on 2 GPUs (accelerate launch --multi_gpu) where there are two;
#   4. FSDP2 through the shipped configs/accelerate/fsdp.yaml (without EMA) on every GPU there is: two
#      epochs through the lambda = 0 switch, then --resume for a third (the attention-free state);
#   5. kill-free resume with --mixed-precision fp16 (the grad scaler exists only on a GPU) in 2 processes
#      (1 on a single GPU): one epoch, state/scaler.pt saved, then --resume through the switch;
#   6. the layer-selection time of DeiT-B on 1024 synthetic images (transfer entropy, bf16);
#   7. benchmark.py: DeiT-T/S/B dense / the reference's removal sets / + ToMe, batch 256, bf16,
#      eager and torch.compile (scripts/bench.sh).
# --dry-run: step 1 collects the tests; 2 runs the DeiT-T recipe at 32 px on 16 images, in fp32, eager
# only (torch.compile on a CPU takes minutes); 3 is skipped; 4 checks the shipped FSDP config's wrap
# policy in every phase with Accelerate's own functions (FSDP needs CUDA); 5 resumes step 2's run for a
# third epoch, in fp32; 6 selects on DeiT-T at 32 px with 8 images; 7 runs benchmark.py once on DeiT-T at 32 px.
# Nothing is written before the checks that it can run (interpreter, imports, CUDA, OUT) pass.
# The report names the GPU, the driver, torch / timm / accelerate versions, the date and the commands;
# paste it into docs/benchmarks.md. fvcore (benchmark GMACs) is installed from .whl/ when it is
# missing and wheels are there (see the device tool's README); without it step 7 is skipped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
QUICK=${QUICK:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stop() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

# --- can it run? Nothing is written before these pass.
[[ -e "$OUT" && ! -d "$OUT" ]] && stop "OUT=$OUT is a file, not a folder"
parent=$OUT
while [[ ! -e "$parent" ]]; do parent=$(dirname "$parent"); done
[[ -d "$parent" && -w "$parent" && -x "$parent" ]] || stop "OUT=$OUT: $parent is not a writable folder"
command -v "$PYTHON" >/dev/null 2>&1 || stop "no interpreter '$PYTHON' (set PYTHON=...)"
[[ "$DRY" == "1" ]] && export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
if ! NGPU=$(PYTHONDONTWRITEBYTECODE=1 "$PYTHON" -c "import torch, timm, accelerate, shrink; print(torch.cuda.device_count())" 2>&1); then
  stop "cannot import torch, timm, accelerate and this clone's shrink with $PYTHON: $(tail -n 1 <<<"$NGPU")"
fi
NGPU=$(tail -n 1 <<<"$NGPU")
if [[ "$DRY" == "0" && "$NGPU" == "0" ]]; then
  stop "no CUDA GPU visible to torch; nothing to check (--dry-run runs every step's set-up on the CPU)"
fi

mkdir -p "$OUT" || stop "cannot create OUT=$OUT"
REPORT="$OUT/REPORT.md"
if [[ "$DRY" == "0" ]] && ! "$PYTHON" -c "import fvcore" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

if [[ "$DRY" == "1" ]]; then
  IMAGES=16; CALIB=8; BATCH=8; PREC=no; SIZE=(--input-size 32); WORKERS=0
elif [[ "$QUICK" == "1" ]]; then
  IMAGES=1024; CALIB=256; BATCH=128; PREC=bf16; SIZE=(); WORKERS=8
else
  IMAGES=5120; CALIB=1024; BATCH=128; PREC=bf16; SIZE=(); WORKERS=8
fi

{
  if [[ "$DRY" == "1" ]]; then
    echo "# GPU check (DRY RUN on the CPU: set-up and the smallest version of every step; no numbers), $(date -u +%Y-%m-%d\ %H:%M) UTC"
  else
    echo "# GPU check, $(date -u +%Y-%m-%d\ %H:%M) UTC"
  fi
  echo
  echo '```'
  [[ "$DRY" == "0" ]] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; }
  "$PYTHON" -c "import torch, timm, accelerate, shrink; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, accelerate {accelerate.__version__}; shrink from {shrink.__file__}, shrink.models from {shrink.models.__file__}')"
  echo "GPUs: $NGPU; command: QUICK=$QUICK bash scripts/gpu_check.sh $*"
  echo '```'
} > "$REPORT"

status() {  # status NAME RC LOG
  if [[ "$2" == "0" ]]; then echo "- $1: ok" >> "$REPORT"; else
    echo "- $1: FAILED (exit $2), last lines of $3:" >> "$REPORT"; echo '```' >> "$REPORT"
    tail -n 15 "$3" >> "$REPORT"; echo '```' >> "$REPORT"; fi
}
skip() { echo "- $1: skipped ($2)" >> "$REPORT"; }
launch() {  # launch NPROC PRECISION [accelerate flags]: the accelerate launcher command, as an array in LAUNCH
  local n=$1 mp=$2; shift 2
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_machines 1 --dynamo_backend no --mixed_precision "$mp" "$@")
  if [[ "$n" -gt 1 ]]; then LAUNCH+=(--multi_gpu --num_processes "$n"); else LAUNCH+=(--num_processes 1); fi
}

echo -e "\n## Results\n" >> "$REPORT"

# 1. tests that need or exercise CUDA
if [[ "$DRY" == "1" ]]; then PYTEST_MODE=(--collect-only); else PYTEST_MODE=(); fi
"$PYTHON" -m pytest -q -p no:cacheprovider "${PYTEST_MODE[@]}" tests/blocks/test_dilution.py tests/training/test_devices.py \
  -m "not slow" > "$OUT/pytest.log" 2>&1
status "GPU tests (pytest tests/blocks/test_dilution.py tests/training/test_devices.py${PYTEST_MODE[*]:+ ${PYTEST_MODE[*]}})" $? "$OUT/pytest.log"

# 2./3. the DeiT recipes, 2 epochs: epoch 0 diluted (lambda 1), epoch 1 attention-free (lambda 0)
RECIPE=(--data-set synthetic --synthetic-images "$IMAGES" "${SIZE[@]}" --no-pretrained --batch-size "$BATCH"
        --dilution-epochs 1 --mixed-precision "$PREC" --repeated-aug --mixup 0.8 --cutmix 1.0
        --distill --drop-path 0.1 --lr 5e-4 --num-workers "$WORKERS" --no-progress)
summary() {  # summary RUN_DIR: one report line with the seconds per epoch of each phase
  "$PYTHON" - "$1" >> "$REPORT" <<'PY'
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
}
recipe() {  # recipe TAG NPROC MODEL LAYERS [extra flags]
  local tag=$1 n=$2 model=$3 layers=$4; shift 4
  launch "$n" "$PREC"
  rm -rf "${OUT:?}/$tag"
  "${LAUNCH[@]}" main_lambda.py --model "$model" --remove-layers "$layers" "${RECIPE[@]}" --epochs 2 --model-ema \
    "$@" --output-dir "$OUT/$tag" > "$OUT/$tag.log" 2>&1
  local rc=$?
  status "recipe $tag ($model, remove $layers, $n process(es) $*)" $rc "$OUT/$tag.log"
  [[ $rc == 0 ]] && summary "$OUT/$tag"
}
recipe deit_tiny 1 deit_tiny_patch16_224 0,2,4
if [[ "$DRY" == "1" ]]; then
  skip "recipes deit_tiny --compile, deit_small, deit_small --compile" "--dry-run: deit_tiny above is their path; torch.compile on a CPU takes minutes"
  skip "2-GPU run" "--dry-run: needs 2 GPUs; multi-process runs on a CPU are the test suite's"
else
  recipe deit_tiny_compile 1 deit_tiny_patch16_224 0,2,4 --compile
  recipe deit_small 1 deit_small_patch16_224 0,2,4
  recipe deit_small_compile 1 deit_small_patch16_224 0,2,4 --compile
  if [[ "$NGPU" -ge 2 ]]; then recipe deit_small_2gpu 2 deit_small_patch16_224 0,2,4;
  else skip "2-GPU run" "1 GPU"; fi
fi

# 4. FSDP2 through Accelerate with the shipped configs/accelerate/fsdp.yaml (no EMA under FSDP): the switch
#    inside the run, then a resume of the attention-free state
if [[ "$DRY" == "1" ]]; then
  "$PYTHON" - > "$OUT/fsdp_policy.log" 2>&1 <<'PY'
import sys
sys.path.insert(0, "tests")
import shrink
from sharding_main import FSDP_YAML, fsdp_plugin_of, units
from shrink.sharding import mark_shard_units

model = shrink.create_model("deit_tiny_patch16_224", img_size=32)
blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
shrink.dilute(model, [0, 2, 4])
plugin = fsdp_plugin_of(FSDP_YAML)
for phase in ("diluted", "after the switch", "after a resume"):
    if phase == "after the switch":
        shrink.export(model, inplace=True)
    if phase == "after a resume":
        plugin = fsdp_plugin_of(FSDP_YAML)
    mark_shard_units(model, plugin)
    got = units(plugin, model)
    assert got == blocks, (phase, got)
    print(f"{phase}: units {got} ({', '.join(plugin.transformer_cls_names_to_wrap)})")
PY
  status "FSDP2 config (configs/accelerate/fsdp.yaml): wrap policy of every phase, in-process (--dry-run: FSDP needs CUDA)" $? "$OUT/fsdp_policy.log"
else
  rm -rf "${OUT:?}/deit_small_fsdp"
  FSDP=("$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes "$NGPU"
        main_lambda.py --model deit_small_patch16_224 --remove-layers 0,2,4 "${RECIPE[@]}" --output-dir "$OUT/deit_small_fsdp")
  "${FSDP[@]}" --epochs 2 > "$OUT/deit_small_fsdp.log" 2>&1 \
    && "${FSDP[@]}" --epochs 3 --resume >> "$OUT/deit_small_fsdp.log" 2>&1
  rc=$?
  [[ $rc == 0 && ! -f "$OUT/deit_small_fsdp/best/model.safetensors" ]] && rc=3
  [[ $rc == 0 && $(wc -l < "$OUT/deit_small_fsdp/metrics.jsonl") -ne 3 ]] && rc=4
  status "FSDP2 via configs/accelerate/fsdp.yaml, $NGPU GPU(s), DeiT-S: 2 epochs through the switch, --resume for a 3rd, valid best/" $rc "$OUT/deit_small_fsdp.log"
fi

# 5. resume with the fp16 grad scaler, 2 processes (1 with a single GPU): one epoch, then --resume through the
#    switch. --dry-run: the CPU has no fp16 scaler; the DeiT-T run of step 2 is resumed for a third epoch
#    (its attention-free state) in one process (2-process resume on a CPU is tests/training/test_multiprocess.py's).
if [[ "$DRY" == "1" ]]; then
  launch 1 no
  "${LAUNCH[@]}" main_lambda.py --model deit_tiny_patch16_224 --remove-layers 0,2,4 "${RECIPE[@]}" --epochs 3 \
    --model-ema --resume --output-dir "$OUT/deit_tiny" > "$OUT/resume.log" 2>&1
  rc=$?
  [[ $rc == 0 && $(wc -l < "$OUT/deit_tiny/metrics.jsonl") -ne 3 ]] && rc=4
  status "resume, fp32 (--dry-run), 1 process, EMA + distillation: deit_tiny resumed for a 3rd epoch" $rc "$OUT/resume.log"
else
  if [[ "$NGPU" -ge 2 ]]; then NP=2; else NP=1; fi
  launch "$NP" fp16
  rm -rf "${OUT:?}/resume_fp16"
  RESUME=("${LAUNCH[@]}" main_lambda.py --model deit_tiny_patch16_224 --remove-layers 0,2,4 "${RECIPE[@]}"
          --mixed-precision fp16 --model-ema --output-dir "$OUT/resume_fp16")
  "${RESUME[@]}" --epochs 1 > "$OUT/resume_fp16.log" 2>&1
  rc=$?
  [[ $rc == 0 && ! -f "$OUT/resume_fp16/state/scaler.pt" ]] && { echo "no state/scaler.pt" >> "$OUT/resume_fp16.log"; rc=3; }
  [[ $rc == 0 ]] && { "${RESUME[@]}" --epochs 2 --resume >> "$OUT/resume_fp16.log" 2>&1; rc=$?; }
  [[ $rc == 0 && $(wc -l < "$OUT/resume_fp16/metrics.jsonl") -ne 2 ]] && rc=4
  status "resume, --mixed-precision fp16, $NP process(es), EMA + distillation: epoch 0, then --resume through the switch" $rc "$OUT/resume_fp16.log"
fi

# 6. selection time, DeiT-B, transfer entropy on synthetic images
if [[ "$DRY" == "1" ]]; then SEL=(--model deit_tiny_patch16_224 --input-size 32 --device cpu --amp off);
else SEL=(--model deit_base_patch16_224 --device cuda --amp bf16); fi
start=$(date +%s.%N)
"$PYTHON" -m shrink.select "${SEL[@]}" --random-init --data-set synthetic --calib-images "$CALIB" --ratio 0.4 \
  --criterion transfer_entropy --output-dir "$OUT/select_b" > "$OUT/select_b.log" 2>&1
rc=$?
secs=$("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
status "selection ${SEL[1]}, $CALIB synthetic images: ${secs} s wall (includes start-up)" $rc "$OUT/select_b.log"

# 7. the benchmark table (eager and compiled), the reference's removal sets and ToMe settings
if ! "$PYTHON" -c "import fvcore" 2>/dev/null; then
  skip "benchmark" "fvcore not installed; carry its wheels in .whl/"
elif [[ "$DRY" == "1" ]]; then
  mkdir -p "$OUT/bench"
  "$PYTHON" benchmark.py --model deit_tiny_patch16_224 --remove-layers 0,2,4 --tome-r 1 --tome-start-idx 1 \
    --compare dense,pruned,pruned+tome --device cpu --batch-size 2 --img-size 32 --warmup 0 --iters 1 --repeats 1 \
    --threads 1 --no-progress --json "$OUT/bench/dry_run.json" > "$OUT/bench.log" 2>&1
  status "benchmark.py, DeiT-T at 32 px, batch 2, one iteration (--dry-run)" $? "$OUT/bench.log"
  { echo -e "\n### benchmark (dry run: not a measurement)\n"; grep '^|' "$OUT/bench.log"; } >> "$REPORT"
else
  BENCH_BATCH=$([[ "$QUICK" == "1" ]] && echo 64 || echo 256)
  OUT="$OUT/bench" BATCH=$BENCH_BATCH DEVICE=cuda PRECISION=bf16 PYTHON="$PYTHON" bash scripts/bench.sh \
    > "$OUT/bench.log" 2>&1
  status "benchmark.py, batch $BENCH_BATCH, bf16, eager + compile (scripts/bench.sh)" $? "$OUT/bench.log"
  for f in "$OUT"/bench/*.md; do [[ -f "$f" ]] && { echo -e "\n### $(basename "$f" .md)\n"; cat "$f"; } >> "$REPORT"; done
fi

cat "$REPORT"
if grep -q FAILED "$REPORT"; then exit 1; fi
exit 0
