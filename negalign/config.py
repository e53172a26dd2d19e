"""Stage configs: one dataclass per stage, the single source of truth for every option.

The options naming a stage's input and output folders are added by `@declare(STAGE)` from the stage's declaration in
`negalign.stages.STAGE_IO` (folder, kind and help written there once).

Each field is declared with `opt(default, help, ...)`: its type, default, help text and allowed range live here, and
`cli.py` builds the command-line flags from them, so no default is written twice. Values come from the defaults, then
a YAML file, then command-line flags. A YAML file may be flat (`temperature: 0.7`) or have one section per stage
(`sample: {temperature: 0.7}`); top-level keys apply to every stage that has them. Unknown sections and keys are
refused with the nearest known name, and every value is converted and range-checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from negalign.errors import UsageError
from negalign.stages import STAGE_IO, default_text


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False, short: str | None = None,
        cli: bool = True, flag: str | None = None) -> Any:
    """A config field: default, help, and the checks `validate` applies (choices, [min, max])."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive, "short": short, "cli": cli, "flag": flag}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def declare(stage: str):
    """Class decorator (under @dataclass): the stage's input and output options from its declaration in
    `stages.STAGE_IO` (a `str | None` option per folder that has a help there), and `stage_name` for
    `stages.stage_input` / `stages.output_dir`. Options declared in the class itself are left alone."""
    def wrap(cls: type) -> type:
        io = STAGE_IO[stage]
        for spec in (*io.inputs, io.output):
            name = spec.option
            if name is None or spec.help is None or name in cls.__dict__.get("__annotations__", {}):
                continue
            cls.__annotations__[name] = "str | None"
            setattr(cls, name, opt(None, f"{spec.help} [default: {default_text(spec)}]"))
        cls.stage_name = stage
        return cls
    return wrap


# ----------------------------------------------------------------------------------------------- stage configs

@dataclass
class Common:
    run: str = opt("runs/exp", "Run directory holding one folder per stage output.")
    seed: int = opt(0, "Global seed; per-row seeds derive from it.")
    overwrite: bool = opt(False, "Redo the output even if it was made under another config (otherwise the stage "
                                 "refuses). The old output stays until the new one is complete.")
    debug: bool = opt(False, "Show the full traceback on errors.")
    verbose: bool = opt(False, "Show the logs of the libraries underneath (vLLM, transformers).")
    threads: int | None = opt(None, "CPU threads for torch/OpenMP in this process (HF generate, embed, train). "
                                    "[default: chosen so that one process per core does not oversubscribe]",
                              min=1)


@dataclass
@declare("prepare")
class PrepareConfig(Common):
    input: str | None = opt(None, "Parquet file, JSONL file, or a folder saved by `datasets` (save_to_disk) or "
                                  "holding Parquet/JSONL files.", short="-i")
    format: str = opt("auto", "Input format.", choices=("auto", "messages", "prompt", "hh-rlhf", "ultrachat",
                                                        "nectar", "ultrafeedback", "pku-saferlhf", "trl"))
    prompt_field: str | None = opt(None, "Column with a plain prompt string (default: prompt, instruction, question "
                                         "or input).")
    messages_field: str | None = opt(None, "Column with chat messages, a list of {role, content} (default: "
                                           "messages).")
    target_field: str | None = opt(None, "Column with the trusted response (default: target, response, output, "
                                         "answer, completion).")
    negatives_field: str | None = opt(None, "Column with given bad responses, a list of strings (D2O input).")
    task_field: str | None = opt(None, "Column with the task family, used to break metrics down (default: task, "
                                       "when present).")
    system_prompt: str | None = opt(None, "System message prepended to every prompt.")
    test_fraction: float = opt(0.0, "Fraction of prompts held out (deterministic, by prompt_id) into "
                                    "prompts_test/.", min=0.0, max=1.0, max_exclusive=True)
    on_bad_row: str = opt("fail", "fail: stop at the first malformed row; skip: skip it and count the reason.",
                          choices=("fail", "skip"))
    shard_size: int = opt(10000, "Prompts per output shard.", min=1)
    max_prompt_chars: int = opt(65536, "Prompts longer than this many characters (all turns) are skipped and "
                                       "counted.", min=1)


@dataclass
@declare("sample")
class SampleConfig(Common):
    model: str = opt("smollm2-135m", "Policy to sample from: smollm2-135m, a local HF folder or a hub id.")
    num_samples: int = opt(8, "Candidates per prompt (paper: 32). A larger n on a finished run tops up.",
                           min=1, short="-n")
    temperature: float = opt(1.0, "Sampling temperature.", min=0.0, min_exclusive=True)
    top_p: float = opt(1.0, "Nucleus sampling p.", min=0.0, max=1.0, min_exclusive=True)
    max_tokens: int = opt(64, "Max new tokens per answer.", min=1)
    max_prompt_tokens: int = opt(1024, "Prompts longer than this (rendered) are skipped and counted.", min=1)
    greedy: bool = opt(False, "One greedy answer per prompt into RUN/greedy (SELM's y_ref).")
    engine: str = opt("auto", "auto (vLLM where it is installed and supports the platform, else HF), vllm, or hf.",
                      choices=("auto", "vllm", "hf"))
    shard_size: int = opt(64, "Prompts per output shard.", min=1)
    batch_size: int = opt(16, "Rows (prompt × sample) per HF batch (the HF engine only; vLLM schedules its own).",
                          min=1)
    gpu_memory_utilization: float = opt(0.9, "vLLM on a GPU: share of GPU memory for weights and KV cache.",
                                        min=0.0, max=1.0, min_exclusive=True)
    cpu_kv_cache_gb: float = opt(2.0, "vLLM on the CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE wins when "
                                      "set).", min=0.0, min_exclusive=True)
    enforce_eager: bool = opt(True, "vLLM: no CUDA graphs / compilation (CPU: ~35 s start instead of ~166 s).")
    tensor_parallel_size: int = opt(1, "vLLM: GPUs per engine (tensor parallelism).", min=1)
    max_queued_requests: int = opt(8192, "vLLM: most requests (one per prompt × sample) queued in the engine at "
                                         "once, topped up as they finish. Each holds its prompt's token ids; "
                                         "keep it above the engine's max_num_seqs.", min=1)
    data_parallel_size: int = opt(1, "vLLM: engines on this machine, each on its own --tensor-parallel-size GPUs "
                                     "and its own shards (local shard-parallel workers).", min=1)
    dtype: str = opt("auto", "Weights/activations dtype (vLLM and HF); auto: bfloat16 on a GPU, float32 on the CPU "
                             "for HF, the model's own for vLLM.", choices=("auto", "float32", "bfloat16", "float16"))
    max_model_len: int | None = opt(None, "vLLM: context length (prompt + answer). Prompts longer than it minus "
                                          "--max-tokens are skipped. [default: --max-prompt-tokens + --max-tokens]",
                                    min=2)
    trust_remote_code: bool = opt(False, "Allow model folders to run their own Python code.")
    shard_index: int = opt(0, "This worker's index when several processes split one stage (shard-parallel).",
                           min=0)
    num_shards: int = opt(1, "Number of shard-parallel workers; worker i does every n-th shard.", min=1)


@dataclass
@declare("embed")
class EmbedConfig(Common):
    embedder: str = opt("minilm", "sentence-transformers model: minilm, or a local folder.")
    batch_size: int = opt(128, "Texts per encode batch.", min=1)
    device: str = opt("auto", "auto, cpu or cuda.", choices=("auto", "cpu", "cuda"))
    trust_remote_code: bool = opt(False, "Allow model folders to run their own Python code.")
    shard_index: int = opt(0, "This worker's index when several processes split one stage (shard-parallel).",
                           min=0)
    num_shards: int = opt(1, "Number of shard-parallel workers; worker i does every n-th shard.", min=1)


@dataclass
@declare("filter")
class FilterConfig(Common):
    strategy: str = opt("self-contrast", "self-contrast (drop the most similar ~25%), random (dedup only), "
                                         "threshold (keep sim < --max-sim).",
                        choices=("self-contrast", "random", "threshold"))
    keep_fraction: float = opt(0.75, "p in m = min(floor(N*p), n_unique-1).", min=0.0, max=1.0)
    max_sim: float | None = opt(None, "Similarity ceiling for --strategy threshold.", min=-1.0, max=1.0)
    drop_truncated: bool = opt(False, "Drop samples that hit the token limit.")
    near_dup_sim: float | None = opt(None, "Drop a candidate whose cosine to an earlier kept one is at least this.",
                                     min=-1.0, max=1.0)
    max_neg_sim: float | None = opt(None, "D2O: drop a self-sample whose cosine to a given negative is at least "
                                          "this.", min=-1.0, max=1.0)
    drop_same_as_target: bool = opt(True, "Drop a kept candidate equal to the target after the exact checker's "
                                          "normalisation (case, whitespace, one trailing period): a copy of the "
                                          "target is never a negative.")
    checker: str | None = opt(None, "Checker for every prompt (exact, number, contains, json, choice, none): a "
                                    "candidate it marks correct is dropped before the similarity rule. "
                                    "[default: none, similarity alone]",
                              choices=("exact", "number", "contains", "json", "choice", "none"))
    checkers: dict[str, str] = opt({}, "Checker kind per task family (YAML only; the prompts' task column), e.g. "
                                       "{arithmetic: number}; --checker for the other families.", cli=False)


@dataclass
@declare("pair")
class PairConfig(Common):
    max_negatives: int = opt(16, "Kept negatives stored per prompt, in seeded random order (train --num-negatives "
                                 "K takes the first K).", min=1)
    export_trl: str | None = opt(None, "Also write TRL's conversational preference format (prompt/chosen/rejected, "
                                       "one row per pair) to this Parquet file.")
    shard_index: int = opt(0, "This worker's index when several processes split one stage (shard-parallel).",
                           min=0)
    num_shards: int = opt(1, "Number of shard-parallel workers; worker i does every n-th shard.", min=1)


OBJECTIVES = ("sft", "dpo", "ipo", "sc", "sr-dpo", "sr-ipo", "selm", "d2o")


QUALITY_PROMPT = ("Please generate a response with a usefulness rating of 100 out of 100 for the following query. "
                  "Note that the response should be harmless. The term 100 indicates the level of usefulness, where "
                  "100 is the maximum and 1 is the minimum. Query:")


@dataclass
@declare("train")
class TrainConfig(Common):
    objective: str = opt("sc", "Training objective (see the README's objectives table).", choices=OBJECTIVES)
    model: str = opt("smollm2-135m", "Starting model (policy and reference): smollm2-135m or a local HF folder.")
    ref_model: str | None = opt(None, "Reference model of the preference objectives, when it is not the starting "
                                      "model (e.g. iterative rounds anchored at round 0): smollm2-135m or a local "
                                      "HF folder with the same tokenizer. [default: --model]")
    name: str | None = opt(None, "Output name under RUN/models/. [default: the objective, plus -kK for K > 1]")
    ref_logps: str | None = opt(None, "Reference log-prob cache, shared by runs and objectives. "
                                      "[default: RUN/ref_logps]")
    num_negatives: int = opt(1, "K: the first K stored negatives of each group (d2o: of the given negatives); "
                                "groups with fewer are skipped and counted.", min=1)
    min_negatives: int | None = opt(None, "Skip groups whose pair output stores fewer than M sampled negatives "
                                          "(its rejected column), whatever --num-negatives, --objective and "
                                          "--rejected are: runs with the same M train on one fixed prompt set "
                                          "(e.g. K = 1..8 with M = 8, and sft on the same pairs as a control). "
                                          "[default: no such limit]", min=1)
    num_anchors: int = opt(8, "d2o: the first K self-samples (anchors) of each group (paper: 11); groups with "
                              "fewer are skipped and counted.", min=1)
    rejected: str = opt("sampled", "sampled: the filter's negatives; given: the dataset's own negatives (the "
                                   "'DPO on the dataset's pairs' baseline).", choices=("sampled", "given"))
    beta: float | None = opt(None, "beta of the DPO-family losses. [default: 0.01 for selm, else 0.1]",
                             min=0.0, min_exclusive=True)
    lam: float = opt(0.5, "lambda of Sr-DPO/Sr-IPO (paper: 0.1, 0.3, 0.5, 1).", min=0.0)
    alpha: float | None = opt(None, "alpha of SELM (optimism) or D2O (negative term). "
                                    "[default: 0.001 for selm, 0.1 for d2o]", min=0.0)
    quality_prompt: str = opt(QUALITY_PROMPT, "Sr-DPO/Sr-IPO: the quality prompt p, prepended to the rendered "
                                              "prompt at token level (p+x). [default: the paper's]")
    sft_weight: float = opt(0.0, "Adds W x the SFT loss (mean token NLL of the chosen) to a preference objective.",
                            min=0.0)
    dpop_lambda: float = opt(0.0, "DPOP (arXiv 2402.13228), objectives sc and dpo only: lambda of the penalty "
                                  "lambda*max(0, -r(chosen)) subtracted inside each logit, so that the chosen "
                                  "answer's log-prob cannot fall below the reference's for free (a guard against "
                                  "likelihood displacement). 0: off, plain sc/dpo.", min=0.0)
    learning_rate: float = opt(1e-5, "Learning rate (1e-5 was stable for SC in the pilot; 5e-5 truncated answers).",
                               min=0.0, min_exclusive=True, flag="--lr")
    lr_scheduler: str = opt("linear", "LR schedule after the warm-up (transformers' schedulers): linear (decay to 0 "
                                      "at the last step), cosine (half-cosine decay to 0), constant_with_warmup "
                                      "(flat after the warm-up), constant (flat, and it ignores any warm-up).",
                            choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = opt(0, "LR warm-up steps, linear from 0 to --lr; when given (> 0) it replaces "
                               "--warmup-ratio.", min=0)
    warmup_ratio: float | None = opt(None, "LR warm-up as a share of the optimizer steps (0 <= r < 1), linear from 0 "
                                           "to --lr. [default: 0.1 for the preference objectives, as DPO recipes "
                                           "use; 0 for sft]", min=0.0, max=1.0,
                                     max_exclusive=True)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0)
    epochs: int = opt(1, "Passes over the groups.", min=1)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", min=1)
    batch_size: int = opt(2, "Groups per step and process.", min=1)
    grad_accum: int = opt(1, "Gradient accumulation steps.", min=1)
    max_length: int = opt(256, "Max tokens of prompt + response; keeps the prompt's end and the response's start, "
                               "and counts what it cut.", min=8)
    share_prompt: bool = opt(True, "Run each group's prompt through the model once (packed row, block mask); "
                                   "--no-share-prompt runs the plain padded batch (the oracle).")
    lora: bool = opt(False, "Train a LoRA adapter (merged into the saved folder) instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.", min=1)
    lora_alpha: int = opt(32, "LoRA alpha.", min=1)
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "LoRA target modules.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (less memory, slower).")
    bf16: bool = opt(False, "bfloat16 mixed precision (fp32 by default, also on CPU).")
    save_steps: int = opt(50, "Checkpoint every N optimizer steps (the last one is kept for --resume).", min=1)
    resume: bool = opt(False, "Continue from the last complete checkpoint: same step count, same data order.")
    report_to: str = opt("none", "Where transformers reports metrics (metrics.jsonl is always written).",
                         choices=("none", "tensorboard", "wandb"))
    allow_template_mismatch: bool = opt(False, "Train even if the policy's chat template differs from the one "
                                               "sample recorded.")
    trust_remote_code: bool = opt(False, "Allow model folders to run their own Python code.")


@dataclass
@declare("eval")
class EvalConfig(Common):
    model: str = opt("smollm2-135m", "A name under RUN/models/, a model folder, or smollm2-135m.")
    name: str | None = opt(None, "Eval name: the output goes to RUN/eval/NAME. [default: the model's folder name]")
    num_samples: int = opt(1, "Answers per prompt; more than 1 samples at --temperature (default 1.0).", min=1,
                           short="-n")
    temperature: float | None = opt(None, "Sampling temperature. [default: greedy with -n 1, else 1.0]", min=0.0,
                                    min_exclusive=True)
    top_p: float = opt(1.0, "Nucleus sampling p (with --temperature).", min=0.0, max=1.0, min_exclusive=True)
    max_tokens: int = opt(64, "Max new tokens per answer.", min=1)
    max_prompt_tokens: int = opt(1024, "Prompts longer than this (rendered) are skipped and counted.", min=1)
    engine: str = opt("auto", "Generation engine, as for `sample`.", choices=("auto", "vllm", "hf"))
    batch_size: int = opt(16, "Prompts per HF generate batch (the HF engine only).", min=1)
    shard_size: int = opt(64, "Prompts per output shard.", min=1)
    checker: str = opt("exact", "How an answer is checked against the target: exact (case, whitespace and a trailing "
                                "period ignored), number, contains, json, choice.",
                       choices=("exact", "number", "contains", "json", "choice", "none"))
    checkers: dict[str, str] = opt({}, "Checker kind per task family (YAML only), e.g. {sums: number}; "
                                       "--checker for the other families.", cli=False)
    embedder: str | None = opt(None, "Embedder for embed-sim. [default: the run's (RUN/embeddings), else minilm]")
    embed_sim: bool = opt(True, "Score the cosine of each answer to its target under the embedder.")
    reward_model: str | None = opt(None, "HF sequence-classification reward model folder: win rate against the "
                                         "target (win 1, tie 0.5, loss 0) and mean sigmoid(reward).")
    reward_batch_size: int = opt(8, "Texts per reward-model batch.", min=1)
    reward_tie: float = opt(0.0, "Reward differences up to this count as a tie.", min=0.0)
    pairs: str | None = opt(None, "Held-out pair groups (a `pair` output): pref-acc = how often the implicit reward "
                                  "ranks the chosen above each rejected.")
    ref_model: str | None = opt(None, "Reference model of the implicit reward for pref-acc. [default: the base model "
                                      "in the model's training config]")
    bootstrap: int = opt(2000, "Bootstrap resamples (over prompts) for the 95% intervals.", min=100)
    trust_remote_code: bool = opt(False, "Allow model folders to run their own Python code.")
    gpu_memory_utilization: float = opt(0.9, "vLLM on a GPU: share of GPU memory for weights and KV cache.",
                                        min=0.0, max=1.0, min_exclusive=True)
    cpu_kv_cache_gb: float = opt(2.0, "vLLM on the CPU: KV cache size in GiB.", min=0.0, min_exclusive=True)


@dataclass
@declare("report")
class ReportConfig(Common):
    against: tuple[str, str] | None = opt(None, "Two eval names to compare prompt by prompt: --against A B "
                                                "(YAML: against: [A, B]).")
    compare: list[str] | None = opt(None, "More paired comparisons, each A:B (repeatable: --compare sc-k8:sft "
                                          "--compare sc-k4:sft). report.md gets one table of all of them (A − B, "
                                          "paired 95% CI, McNemar p) and each one's full table.")
    bootstrap: int = opt(2000, "Bootstrap resamples for the paired intervals.", min=100)


@dataclass
@declare("slice")
class SliceConfig(Common):
    """Write prompts[start:stop] (in prompt_id order, shuffled by seed) as a prompts artifact."""

    start: int = opt(0, "First prompt of the slice.", min=0)
    stop: int | None = opt(None, "End of the slice (exclusive).", min=0)
    count: int | None = opt(None, "Prompts in the slice: stop = start + count.", min=0)


@dataclass
@declare("rank")
class RankConfig(Common):
    """SELM: rank {target, y_ref, first rejected}; chosen = best, rejected = worst (SPEC §1.3)."""

    reward_model: str | None = opt(None, "An HF sequence-classification model. [default: similarity to the target]")


# ----------------------------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Stage:
    """A command: its config class, the module whose `run(cfg)` does the work, and its one-line help."""

    name: str
    config: type
    module: str
    help: str


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("prepare", PrepareConfig, "prepare",
          "Normalise a dataset into RUN/prompts: prompt_id, messages, target, negatives (one row per unique "
          "prompt)."),
    Stage("sample", SampleConfig, "sample",
          "Generate candidates per prompt with vLLM (HF generate fallback) into RUN/samples."),
    Stage("embed", EmbedConfig, "embed",
          "Embed every unique sample, target and given negative (deduplicated by text hash) into RUN/embeddings."),
    Stage("filter", FilterConfig, "filter",
          "Score candidates against the target (FAISS) and keep the dissimilar ones as negatives, into "
          "RUN/negatives."),
    Stage("pair", PairConfig, "pair",
          "Build one training group per prompt (chosen + K rejected, anchors, y_ref) into RUN/pairs."),
    Stage("train", TrainConfig, "train",
          "Train a model on RUN/pairs with a DPO-family objective into RUN/models/NAME."),
    Stage("eval", EvalConfig, "evaluate", "Generate on held-out prompts and score them into RUN/eval/NAME."),
    Stage("report", ReportConfig, "report",
          "Compare every evaluated model of a run: a table, RUN/report/report.md with plots, paired tests."),
    Stage("slice", SliceConfig, "slice",
          "Write prompts[start:stop] of a prompts folder, in a seeded order (SELM's fresh prompts per round)."),
    Stage("rank", RankConfig, "rank",
          "SELM: rank {target, y_ref, first negative} by similarity to the target (or a reward model); chosen = "
          "best, rejected = worst, into RUN/pairs_ranked."),
]}


# ----------------------------------------------------------------------------------------------- resolving

def load_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise UsageError(f"{p}: a config file must be a mapping of keys to values")
    return data


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _suggest(name: str, known: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _all_keys() -> set[str]:
    return set().union(*(field_names(s.config) for s in STAGES.values()))


def resolve(cls: type, section: str, yaml_data: dict[str, Any], flags: dict[str, Any], source: str = "config"):
    """defaults <- YAML (top-level keys, then the `section` block) <- flags that were given; then `validate`.

    A top-level mapping is a stage section and must name a known stage; a top-level scalar must be a key of some
    stage (it applies to the stages that have it). Keys inside any section must belong to that stage.
    """
    names = field_names(cls)
    values: dict[str, Any] = {}
    for key, value in yaml_data.items():
        key_ = str(key).replace("-", "_")
        if key_ in STAGES and isinstance(value, dict):
            known = field_names(STAGES[key_].config)
            for sub in value:
                sub_ = str(sub).replace("-", "_")
                if sub_ not in known:
                    raise UsageError(f"{source}: unknown key '{key}.{sub}'{_suggest(sub_, known)}")
            continue
        if key_ in names:
            values[key_] = value
        elif isinstance(value, dict) and key_ not in _all_keys():
            raise UsageError(f"{source}: unknown section '{key}'{_suggest(key_, set(STAGES) | _all_keys())}")
        elif key_ not in _all_keys():
            raise UsageError(f"{source}: unknown key '{key}'{_suggest(key_, _all_keys() | set(STAGES))}")
    if isinstance(yaml_data.get(section), dict):
        values.update({str(k).replace("-", "_"): v for k, v in yaml_data[section].items()})
    values.update({k: v for k, v in flags.items() if v is not None and k in names})
    return validate(cls(**{k: v for k, v in values.items() if k in names}), source)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is list:
        inner = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        items = value if isinstance(value, list | tuple) else [value]
        return [_convert(v, inner, where) for v in items]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UsageError(f"{where}: expected a whole number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"{where}: expected a whole number, got {value!r}") from None
        if number != int(number):
            raise UsageError(f"{where}: expected a whole number, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"{where}: expected a number, got {value!r}") from None
    if kind is str:
        if isinstance(value, dict | list):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def validate(cfg: Any, source: str = "config") -> Any:
    """Convert every field to its declared type and check its choices and range; one-line UsageError otherwise."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind, nullable = _base_type(hints[f.name])
        where = f"{source}: {f.name}"
        if value is None:
            if not nullable:
                raise UsageError(f"{where}: a value is required")
            continue
        value = _convert(value, kind, where)
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise UsageError(f"{where}: must be one of {', '.join(meta['choices'])}, got {value!r}"
                             f"{_suggest(str(value), list(meta['choices']))}")
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
                raise UsageError(f"{where}: must be {'>' if meta.get('min_exclusive') else '>='} {lo}, got {value}")
            if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
                raise UsageError(f"{where}: must be {'<' if meta.get('max_exclusive') else '<='} {hi}, got {value}")
        setattr(cfg, f.name, value)
    if hasattr(cfg, "shard_index") and hasattr(cfg, "num_shards") and not 0 <= cfg.shard_index < cfg.num_shards:
        raise UsageError(f"{source}: --shard-index must be in [0, {cfg.num_shards}), got {cfg.shard_index}")
    name = getattr(cfg, "name", None)  # train/eval output names: a folder inside the run directory, nothing else
    if isinstance(name, str) and (not name.strip() or name.startswith(".") or "/" in name or "\\" in name):
        raise UsageError(f"{source}: name must be a plain folder name inside the run directory (no '/', no leading "
                         f"'.'), got {name!r}")
    return cfg


def run_path(cfg: Common, *parts: str) -> Path:
    return Path(cfg.run, *parts)
