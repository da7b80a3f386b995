#!/usr/bin/env bash
# The main job on the offline default: set up, build the stdlib corpus (byte-level, no download),
# then train configs/quickstart.py. Extra arguments go to train.py (e.g. train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
[ -f data/stdlib/tokenizer.json ] || \
  .venv/bin/python corpus.py prepare --input stdlib --tokenizer bytes --out data/stdlib
# XLA:CPU's per-step temporaries in 2 MiB pages rather than 4 KiB ones: faster steps at the same peak
# memory (README, "Speed on a CPU"); a GLIBC_TUNABLES already set is kept.
export GLIBC_TUNABLES=${GLIBC_TUNABLES-glibc.malloc.hugetlb=1}
.venv/bin/python train.py --config configs/quickstart.py "$@"
