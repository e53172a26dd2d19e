#!/usr/bin/env bash
# The main job on the offline default models (SmolLM2-135M-Instruct + all-MiniLM-L6-v2), sized for a 2-core CPU:
# 48 short-answer prompts (capitals, sums, word reversal), 8 samples each, 32 new tokens.
# Re-running resumes: finished stages are skipped.
set -euo pipefail
RUN=${RUN:-runs/demo}
PY=${PY:-.venv/bin/python}
NEGALIGN="$PY -m negalign"

$NEGALIGN env
$NEGALIGN prepare --run "$RUN" --input examples/data/short_answers.jsonl --test-fraction 0.25
$NEGALIGN sample  --run "$RUN" -n 8 --max-tokens 32 --temperature 1.0
$NEGALIGN sample  --run "$RUN" --greedy --max-tokens 32
$NEGALIGN embed   --run "$RUN"
$NEGALIGN filter  --run "$RUN" --strategy self-contrast --keep-fraction 0.75
$NEGALIGN pair    --run "$RUN" --max-negatives 16 --export-trl "$RUN/trl_pairs.parquet"
$NEGALIGN inspect "$RUN/negatives" --examples 0
$NEGALIGN inspect "$RUN"
