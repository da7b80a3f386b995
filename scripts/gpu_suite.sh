#!/usr/bin/env bash
# The GPU rows of notes/benchmarks.md, on one GPU, in bf16 with cuDNN attention where its shape
# rules allow: JAX's training step on gpt2_124m against the PyTorch twin (eager and torch.compile),
# then paired A/B of the loss blocks and remat, JAX alone without remat and at four times the batch, sample.py's decode speed, and JAX
# against eager PyTorch on modern_160m. Each table goes to OUT_DIR/NAME.txt and its rows to
# OUT_DIR/NAME.json. Extra arguments go to every `bench.py train` run (after the suite's own, so
# they win): e.g. `--steps 1 --warmup 0 --batch 1 --seq 64` for a quick look on a CPU. ONLY, a
# space-separated list of the NAMEs below, runs just those (the whole set takes over 10 minutes).
# Usage: [ONLY="NAME ..."] scripts/gpu_suite.sh OUT_DIR [bench.py train arguments...]
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [bench.py train arguments...]}
shift
cd "$(dirname "$0")/.."
names="train_gpt2_124m profile_gpt2_124m ab_gpt2_124m train_gpt2_124m_remat_none train_gpt2_124m_b64 decode_gpt2_124m train_modern_160m"
for name in ${ONLY:-}; do
  [[ " $names " == *" $name "* ]] || { echo "error: ONLY names $name; choose from: $names" >&2; exit 2; }
done
python=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
status=0
bench() {  # NAME SECONDS bench.py-arguments...: one benchmark, stopped after SECONDS
  local name=$1 seconds=$2
  shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  timeout "$seconds" "$python" bench.py "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "bench.py $1 ($name) exited $rc"; status=$rc; }
}
bench train_gpt2_124m 240 train --config configs/gpt2_124m.py --batch 16 --seq 1024 --steps 10 "$@"
# Where JAX's step time goes on the GPU, per category and per kernel (XLA's command buffers off).
bench profile_gpt2_124m 150 profile --config configs/gpt2_124m.py --batch 16 --seq 1024 --steps 3
# Paired in one process: the loss in blocks (model.loss_chunks=0 picks 16 at 16 x 1024) against
# the whole [16,384 x 50,304] float32 logits, and remat none against dots.
bench ab_gpt2_124m 240 ab --config configs/gpt2_124m.py --batch 16 --seq 1024 --rounds 10 --variant blocks \
  --variant whole:model.loss_chunks=1 --variant remat_none:model.remat=none
# GPU memory is plentiful: JAX alone without rematerialization (model.remat's default, dots,
# recomputes attention in the backward pass), and at four times the batch.
bench train_gpt2_124m_remat_none 120 train --config configs/gpt2_124m.py model.remat=none --batch 16 --seq 1024 \
  --steps 10 --modes jit "$@"
bench train_gpt2_124m_b64 120 train --config configs/gpt2_124m.py model.remat=none --batch 64 --seq 1024 \
  --steps 10 --modes jit "$@"
bench decode_gpt2_124m 90 decode --config configs/gpt2_124m.py model.param_dtype=bfloat16 \
  model.compute_dtype=bfloat16 --batches 1,16,64 --repeats 3
bench train_modern_160m 240 train --config configs/modern_160m.py --batch 8 --seq 2048 --steps 10 \
  --modes jit,eager "$@"
exit "$status"
