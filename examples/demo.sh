#!/usr/bin/env bash
# The main job on the offline default models (SmolLM2-135M-Instruct + all-MiniLM-L6-v2), sized for a 2-core CPU.
# Re-running resumes: finished stages are skipped.
set -euo pipefail
RUN=${RUN:-runs/demo}
PY=${PY:-.venv/bin/python}
NEGALIGN="$PY -m negalign"

$NEGALIGN env
$NEGALIGN prepare --run "$RUN" --input examples/data/short_answers.jsonl --test-fraction 0.25
$NEGALIGN inspect "$RUN"
