#!/usr/bin/env bash
# Run `python train.py ARGS...` as P processes on this machine, each with D simulated CPU devices,
# joined through jax.distributed on localhost: the multi-host path, testable anywhere.
# Usage: scripts/launch_local.sh P D --config configs/NAME.py [overrides...]
# SIGTERM/SIGINT are forwarded to every process, so a stop saves one consistent checkpoint.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 PROCESSES DEVICES_PER_PROCESS --config configs/NAME.py [overrides...]" >&2
  exit 2
fi
processes=$1 devices=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
port=${PORT:-$($python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices $python train.py \
    --coordinator "127.0.0.1:$port" --num-processes "$processes" --process-id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break   # wait was only interrupted by a forwarded signal
  done
  [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
