#!/usr/bin/env bash
# A/B of two commits, alternating, in one run (bench/ab.py says how); installs what it needs like run.sh:
#   bench/measure_project.sh [A=778ffcc] [B=HEAD] [--rounds 3] [--seconds 3] [--only json,fold,stream,c1,messages,responses]
BENCH_SCRIPT=ab.py exec "$(dirname "$0")/run.sh" "$@"
