"""`negalign run PIPELINE.yaml`: a whole experiment from one file, skipping what is already done.

A pipeline file names the run directory, optional size variables and per-stage defaults, and a list of steps:

    run: runs/demo
    seed: 0
    vars: {n_samples: 16}                       # `${n_samples}` anywhere below; `--set n_samples=4` overrides
    defaults: {sample: {max_tokens: 24}}        # options for every step of a stage
    steps:
      - {name: prepare, stage: prepare, input: examples/data/tasks_train.parquet}
      - {name: sample, stage: sample, model: "@sft", num_samples: "${n_samples}"}   # @STEP = that step's output
      - {name: sc, stage: train, objective: sc, num_negatives: [1, 8], eval: {prompts: "@test"}}  # a sweep

Order comes from the data: a step runs after every step whose output it reads (an option naming that folder, a
stage's default input such as RUN/prompts, or `@STEP`), YAML order otherwise; `after: [STEP]` adds an edge.
A list given for an option that is not a list is a sweep: one step per value (`sc-k1`, `sc-k8`), and `eval:` on a
train step adds one `eval` per trained model. `iterations: T` with inner `steps:` runs the rounds in
RUN/NAME/iter-1 … iter-T (SPIN, SELM, online D2O): round t samples from round t−1's model.

Every stage step runs as its own `negalign STAGE --config RUN/_pipeline/steps/NAME.yaml` process (the file stays, so
a step can be rerun by hand). A step is skipped when its outputs are complete and neither its options nor the
fingerprints of its inputs changed since the pipeline last ran it (recorded in RUN/_pipeline/state.json, next to
the stages' own manifests); a changed step is redone with --overwrite, except a change the stage resumes by itself
(a larger `num_samples` tops up). The first failure stops the run with the step's name and the one-line error.

The package in four parts, one job each: `expand` (the YAML file -> concrete steps: variables, sweeps, iterations),
`graph` (each step's config, outputs and inputs from the stage declarations in `negalign.stages`, the dependencies
and the run order), `state` (RUN/_pipeline/state.json: what is done, what changed) and `runner` (one `negalign
STAGE` process per step, the plan table, the closing report).
"""

from negalign.pipeline.expand import Pipeline, Step
from negalign.pipeline.graph import absolute_path
from negalign.pipeline.runner import plan_table, run_file
from negalign.pipeline.state import State, path_fingerprint

__all__ = ["Pipeline", "State", "Step", "absolute_path", "path_fingerprint", "plan_table", "run_file"]
