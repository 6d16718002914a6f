#!/usr/bin/env bash
# One command on a fresh machine: install what the benchmark needs, then run it.
#   bench/run.sh [--seconds 5] [--smoke] [--with-litellm] [--only json,fold,stream,messages,endurance]
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q && apt-get install -y -q "${missing[@]}"
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
  pip install -q -r requirements.txt
fi
exec python "bench/${BENCH_SCRIPT:-run.py}" "$@"
