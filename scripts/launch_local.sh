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
# jax's CPU collectives (gloo) print "[Gloo] Rank N is connected to K peer ranks..." on stdout for
# every communicator they open, and nothing turns it off. Process 0's stdout goes through a filter
# that drops those lines (it ignores TERM and INT, so it passes on the last words of a stop); the
# other processes print nothing else on stdout (train.py logs from process 0), so theirs is
# dropped. Every stderr is kept.
exec 3> >(trap '' TERM INT; exec grep --line-buffered -v '^\[Gloo\] Rank [0-9]* is connected to ')
filter=$!
# The coordinator is on this machine: keep an HTTP proxy of the environment out of its gRPC
# connections (they honour no_proxy); through a proxy, they fail to connect.
if [ -n "${http_proxy:-}${https_proxy:-}${HTTP_PROXY:-}${HTTPS_PROXY:-}${all_proxy:-}${ALL_PROXY:-}" ]; then
  export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}" NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < processes; i++)); do
  if [ "$i" -eq 0 ]; then out=/dev/fd/3; else out=/dev/null; fi
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices $python train.py \
    --coordinator "127.0.0.1:$port" --num-processes "$processes" --process-id "$i" "$@" >"$out" &
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
exec 3>&-
wait "$filter"
exit "$status"
