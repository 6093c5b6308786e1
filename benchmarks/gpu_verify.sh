#!/bin/sh
# What a lent CUDA machine should run (`make gpu-smoke`, `make gpu-verify`; needs no make itself).
#
#   sh benchmarks/gpu_verify.sh smoke|tests|all|big [LOGS]
#
# smoke: RigL + AGC + PGD-AT in float32 with --deterministic, SIGKILLed at a known step of epoch 2
# and resumed, against two uninterrupted runs, all three bit-identical (tests/gpu_resume.py); the same in bfloat16 autocast with
# channels_last; AutoAttack (standard) on 300 points; throughput from the metrics.
# tests: smoke and the CUDA tests, logs in LOGS. all: those, then the GPU rows of benchmarks/train_throughput.py and
# benchmarks/structured_speed.py (benchmarks/RESULTS.md, "GPU"), each step's log in LOGS (default
# runs/gpu-logs); a step that fails does not stop the next. big: only the same two benchmarks at
# batch sizes that fill a large card (PGD-AT batch 1024-2048, inference 4096-8192), logs in LOGS.
# GPU_PYTHON: the interpreter holding a CUDA torch and the project's needs (default python3).
# Fashion-MNIST is read from data/fashion-mnist when the files are there (carried to the machine:
# too big beside the tree for a 64 MiB carry, so sent xz-compressed and re-gzipped there, as in
# benchmarks/RESULTS.md's second GPU section), else from the usual places.
set -u
PY=${GPU_PYTHON:-python3}
WHAT=${1:-smoke}
LOGS=${2:-runs/gpu-logs}
DATA=""
ls data/fashion-mnist/*.gz >/dev/null 2>&1 && DATA="--data-dir data/fashion-mnist"
ARGS="$DATA --device cuda --optimizer agc --sparse-method rigl --sparsity 0.9 --train-subset 20000 --no-progress"

smoke() {
    $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || return 1
    $PY tests/gpu_resume.py --out runs/gpu-smoke -- $ARGS --epochs 4 --deterministic || return 1
    $PY -m robust_agc train $ARGS --epochs 2 --amp bf16 --channels-last --out runs/gpu-smoke-bf16 \
        --overwrite || return 1
    $PY -m robust_agc eval runs/gpu-smoke/resumed/best.pt $DATA --device cuda \
        --attacks clean,autoattack --n-examples 300 --batch-size 300 --seed 0 \
        --out runs/gpu-smoke/eval.json --overwrite || return 1
    $PY -c "import json; [print(run, 'epoch', r['epoch'], 'images/s', round(r['images_per_s'])) for run in ('runs/gpu-smoke/resumed', 'runs/gpu-smoke-bf16') for r in map(json.loads, open(run + '/metrics.jsonl'))]"
}

big() {
    $PY benchmarks/train_throughput.py --device cuda --amp off,bf16 --optimizers sgd,agc \
        --models preact-resnet18 --images 16384 --batch-size 1024 --repeats 2 --warmup 1 \
        > "$LOGS/train_throughput_big.log" 2>&1
    echo "train_throughput (batch 1024): exit $?"; tail -12 "$LOGS/train_throughput_big.log"
    $PY benchmarks/structured_speed.py --device cuda --batch 8192 --big-batch 4096 \
        --train-batch 2048 --big-train-batch 1024 --aa-points 4096 --aa-points-big 1024 \
        > "$LOGS/structured_speed_big.log" 2>&1
    echo "structured_speed (big batches): exit $?"; tail -20 "$LOGS/structured_speed_big.log"
}

if [ "$WHAT" = smoke ]; then
    smoke
    exit $?
fi
mkdir -p "$LOGS"
if [ "$WHAT" = big ]; then
    big
    exit 0
fi
smoke > "$LOGS/smoke.log" 2>&1; echo "smoke: exit $?"; tail -25 "$LOGS/smoke.log"
cp runs/gpu-smoke/eval.json "$LOGS/smoke-eval.json" 2>/dev/null
$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py tests/test_amp.py \
    tests/test_masks_contract.py > "$LOGS/cuda-tests.log" 2>&1
echo "cuda tests: exit $?"; tail -30 "$LOGS/cuda-tests.log"
[ "$WHAT" = tests ] && exit 0
$PY benchmarks/train_throughput.py --device cuda --amp off,bf16 --optimizers sgd,agc \
    --models small-cnn,preact-resnet18 --images 8192 --batch-size 256 --repeats 3 --warmup 1 \
    > "$LOGS/train_throughput.log" 2>&1
echo "train_throughput: exit $?"; tail -20 "$LOGS/train_throughput.log"
$PY benchmarks/structured_speed.py --device cuda --batch 1024 --big-batch 512 --train-batch 512 \
    --big-train-batch 256 --aa-points 1024 --aa-points-big 256 > "$LOGS/structured_speed.log" 2>&1
echo "structured_speed: exit $?"; tail -20 "$LOGS/structured_speed.log"
