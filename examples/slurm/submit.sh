#!/usr/bin/env bash
# The whole Self-Contrast pipeline on a Slurm cluster, each data stage as a job array of shard-parallel workers
# over a shared file system, chained with dependencies:
#   RUN=/shared/runs/exp WORKERS=8 bash examples/slurm/submit.sh data.jsonl
# prepare (1 CPU job) -> sample (WORKERS GPU tasks) -> embed (WORKERS tasks) -> filter (1 CPU job)
#   -> pair (WORKERS CPU tasks) -> train (one node, all its GPUs, accelerate launch)
# Every stage resumes: re-submitting this script after a failure redoes only the missing shards.
# The shard layout is fixed by `sample --shard-size` (prompts per shard); use at least WORKERS shards.
set -euo pipefail
: "${RUN:?set RUN to the run directory on the shared file system}"
INPUT=${1:?usage: RUN=... bash examples/slurm/submit.sh INPUT_FILE}
WORKERS=${WORKERS:-8}
HERE=$(cd "$(dirname "$0")" && pwd)
export RUN
mkdir -p logs
last=$((WORKERS - 1))
cpu=(--gres=none --cpus-per-task=8)

prep=$(sbatch --parsable --job-name=negalign-prepare "${cpu[@]}" --output=logs/%x-%j.log \
  --wrap "negalign prepare --run $RUN --input $INPUT --test-fraction 0.05")
sample=$(sbatch --parsable --dependency=afterok:$prep --array=0-$last --job-name=negalign-sample \
  "$HERE/stage.sbatch" sample -n 32 --max-tokens 256 --shard-size 1024)
greedy=$(sbatch --parsable --dependency=afterok:$prep --array=0-$last --job-name=negalign-greedy \
  "$HERE/stage.sbatch" sample --greedy --max-tokens 256 --shard-size 1024)
embed=$(sbatch --parsable --dependency=afterok:$sample:$greedy --array=0-$last --job-name=negalign-embed \
  "$HERE/stage.sbatch" embed)
filter=$(sbatch --parsable --dependency=afterok:$embed --job-name=negalign-filter "${cpu[@]}" \
  --output=logs/%x-%j.log --wrap "negalign filter --run $RUN")
pair=$(sbatch --parsable --dependency=afterok:$filter --array=0-$last --job-name=negalign-pair "${cpu[@]}" \
  "$HERE/stage.sbatch" pair --max-negatives 16)
train=$(sbatch --parsable --dependency=afterok:$pair "$HERE/train.sbatch" --objective sc --num-negatives 8)
echo "submitted: prepare $prep, sample $sample, greedy $greedy, embed $embed, filter $filter, pair $pair, train $train"
