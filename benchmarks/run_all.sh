#!/usr/bin/env bash
# Runs every stage benchmark against its obvious alternative (one run per stage, side by side) and rebuilds
# benchmarks/RESULTS.md from the per-stage sections. Usage: make bench   (or: bash benchmarks/run_all.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${1:-}" != "--assemble-only" ]; then
  mkdir -p benchmarks/out
  $PY benchmarks/bench_sample.py
  $PY benchmarks/bench_embed.py
  # RESULTS_filter.md holds hand-written before/after sections: the new table goes beside it, to compare by hand
  $PY benchmarks/bench_filter.py --results benchmarks/out/RESULTS_filter.latest.md
  $PY benchmarks/bench_store.py   # prints the table; RESULTS_filter.md keeps it by hand
  # scale: filter and pair via the CLI at 10k/100k/1M prompts and the store alone at 100k shards (1M is long:
  # SCALE_SIZES=10000,100000 make bench to leave it out); RESULTS_scale.md is kept by hand from this table
  $PY benchmarks/bench_scale.py --sizes "${SCALE_SIZES:-10000,100000,1000000}" --results benchmarks/out/RESULTS_scale.latest.md
  $PY benchmarks/bench_train.py --prompts 16 --steps 5 --batch-size 2 --dpo-batch-size 4 --results benchmarks/RESULTS_train.md
  $PY benchmarks/bench_eval.py --prompts 16 --max-tokens 32 --engines hf,vllm --repeat 4
fi
{
  echo "# Benchmark results"
  echo
  echo "Each section compares one negalign stage with the obvious alternative in the same run; ratios are the"
  echo "figures to trust (absolute times on a shared 2-core machine are noisy). Regenerate with \`make bench\`."
  echo
  for part in sample embed filter train eval; do
    [ -f "benchmarks/RESULTS_$part.md" ] && { cat "benchmarks/RESULTS_$part.md"; echo; }
  done
} > benchmarks/RESULTS.md
echo "wrote benchmarks/RESULTS.md"
