#!/usr/bin/env bash
# The main job on the offline default: set up, build the stdlib corpus (byte-level, no download),
# then train configs/quickstart.py. Extra arguments go to train.py (e.g. train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
[ -f data/stdlib/tokenizer.json ] || \
  .venv/bin/python corpus.py prepare --input stdlib --tokenizer bytes --out data/stdlib
.venv/bin/python train.py --config configs/quickstart.py "$@"
