#!/usr/bin/env bash
# `make demo`: examples/demo.yaml on the offline default models (SmolLM2-135M-Instruct + all-MiniLM-L6-v2).
# SFT -> sample -> embed -> filter -> pair -> train sc -> eval base/SFT/SC on held-out prompts -> report.
# Re-running skips every finished step. Extra overrides: DEMO_SET="--set sft_prompts=72 --set test_prompts=72".
set -euo pipefail
RUN=${RUN:-runs/demo}
PY=${PY:-.venv/bin/python}
start=$(date +%s)
# shellcheck disable=SC2086
"$PY" -m negalign run examples/demo.yaml --set "run=$RUN" ${DEMO_SET:-}
echo "demo: wall time $(( $(date +%s) - start )) s (run directory $RUN; '$PY -m negalign run examples/demo.yaml --dry-run' shows each step's state)"
