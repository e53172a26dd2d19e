"""The `negalign` command line: flags -> a stage config -> `negalign.<stage>.run(cfg)`. Nothing else lives here."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from negalign import __version__
from negalign.config import (
    EmbedConfig,
    EvalConfig,
    FilterConfig,
    PairConfig,
    PrepareConfig,
    SampleConfig,
    TrainConfig,
    load_yaml,
    resolve,
)
from negalign.errors import NegalignError, UsageError

app = typer.Typer(
    name="negalign",
    help="Align language models without preference labels: sample many answers, keep the ones far from the "
         "target as negatives, and train with a DPO-family objective (Self-Contrast, Sr-DPO/IPO, SELM, D2O).\n\n"
         "Each stage reads from and writes one folder of a run directory (--run), as Parquet shards plus a "
         "manifest.json; re-running a stage resumes it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every stage command.
Run = Annotated[Path | None, typer.Option("--run", help="Run directory holding one folder per stage output. "
                                          "[default: runs/exp]", show_default=False)]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with the same keys as the flags "
                                                 "(flat, or one section per stage); flags win.")]
Seed = Annotated[int | None, typer.Option(help="Global seed; per-row seeds derive from it. [default: 0]",
                                          show_default=False)]
Overwrite = Annotated[bool | None, typer.Option("--overwrite", help="Redo the output even if it was made under "
                                                "another config (otherwise the stage refuses).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
ShardIndex = Annotated[int | None, typer.Option(help="This worker's index when several processes split one "
                                                "stage (shard-parallel). [default: 0]", show_default=False)]
NumShards = Annotated[int | None, typer.Option(help="Number of shard-parallel workers; worker i does every "
                                               "n-th shard. [default: 1]", show_default=False)]
TrustRemoteCode = Annotated[bool | None, typer.Option("--trust-remote-code",
                                                      help="Allow model folders to run their own Python code.")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _execute(stage: str, cls: type, config_file: Path | None, flags: dict[str, Any], module: str | None = None):
    """Resolve the config, import the stage module and run it; errors become one line and an exit code."""
    debug = bool(flags.get("debug"))
    try:
        flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
        cfg = resolve(cls, stage, load_yaml(config_file), flags, source=str(config_file or "flags"))
        debug = debug or cfg.debug
        try:
            mod = importlib.import_module(f"negalign.{module or stage}")
        except ModuleNotFoundError as e:
            if e.name == f"negalign.{module or stage}":
                raise UsageError(f"'{stage}' is not implemented yet: see the README") from e
            raise
        return mod.run(cfg)
    except typer.Exit:
        raise
    except NegalignError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; re-run the same command to resume", 130)
    except Exception as e:  # noqa: BLE001 — one line for users, the traceback with --debug
        if debug:
            raise
        _fail(f"{type(e).__name__}: {e} (use --debug for the traceback)", 1)


@app.command()
def prepare(
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Parquet file, JSONL file, or a folder saved "
                                               "by `datasets` (save_to_disk) or holding Parquet/JSONL files.")] = None,
    format: Annotated[str | None, typer.Option(help="Input format: auto, messages, prompt, hh-rlhf, ultrachat, "
                                               "nectar, ultrafeedback, pku-saferlhf, trl. [default: auto]",
                                               show_default=False)] = None,
    prompt_field: Annotated[str | None, typer.Option(help="Column with a plain prompt string (default: prompt, "
                                                     "instruction, question or input).")] = None,
    messages_field: Annotated[str | None, typer.Option(help="Column with chat messages, a list of {role, content} "
                                                       "(default: messages).")] = None,
    target_field: Annotated[str | None, typer.Option(help="Column with the trusted response (default: target, "
                                                     "response, output, answer, completion).")] = None,
    negatives_field: Annotated[str | None, typer.Option(help="Column with given bad responses, a list of strings "
                                                        "(D2O input).")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System message prepended to every prompt.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Fraction of prompts held out (deterministic, by "
                                                        "prompt_id) into prompts_test/. [default: 0]",
                                                        show_default=False)] = None,
    on_bad_row: Annotated[str | None, typer.Option(help="fail: stop at the first malformed row; skip: skip it and "
                                                   "count the reason. [default: fail]", show_default=False)] = None,
    run: Run = None, config: ConfigFile = None, seed: Seed = None, overwrite: Overwrite = None, debug: Debug = False,
) -> None:
    """Normalise a dataset into RUN/prompts: prompt_id, messages, target, negatives (one row per unique prompt)."""
    _execute("prepare", PrepareConfig, config, locals())


@app.command()
def sample(
    model: Annotated[str | None, typer.Option(help="Policy to sample from: smollm2-135m, a local HF folder or a hub "
                                              "id. [default: smollm2-135m]", show_default=False)] = None,
    num_samples: Annotated[int | None, typer.Option("--num-samples", "-n", help="Candidates per prompt (paper: 32). "
                                                    "A larger n on a finished run tops up. [default: 8]",
                                                    show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature. [default: 1.0]",
                                                      show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling p. [default: 1.0]", show_default=False)] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per answer. [default: 64]",
                                                   show_default=False)] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Prompts longer than this (rendered) are skipped and "
                                                          "counted. [default: 1024]", show_default=False)] = None,
    greedy: Annotated[bool | None, typer.Option("--greedy", help="One greedy answer per prompt into RUN/greedy "
                                                "(SELM's y_ref).")] = None,
    engine: Annotated[str | None, typer.Option(help="auto (vLLM if it starts, else HF), vllm, or hf. "
                                               "[default: auto]", show_default=False)] = None,
    shard_size: Annotated[int | None, typer.Option(help="Prompts per output shard. [default: 64]",
                                                   show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per HF generate batch. [default: 16]",
                                                   show_default=False)] = None,
    cpu_kv_cache_gb: Annotated[float | None, typer.Option(help="vLLM on the CPU: KV cache size in GiB. "
                                                          "[default: 2]", show_default=False)] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="vLLM on a GPU: share of GPU memory it may "
                                                                 "use. [default: 0.9]", show_default=False)] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts folder. [default: RUN/prompts]",
                                                 show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder. [default: RUN/samples or RUN/greedy]",
                                             show_default=False)] = None,
    run: Run = None, config: ConfigFile = None, seed: Seed = None, overwrite: Overwrite = None, debug: Debug = False,
    shard_index: ShardIndex = None, num_shards: NumShards = None, trust_remote_code: TrustRemoteCode = None,
) -> None:
    """Generate candidates per prompt with vLLM (HF generate fallback) into RUN/samples."""
    _execute("sample", SampleConfig, config, locals())


@app.command()
def embed(
    embedder: Annotated[str | None, typer.Option(help="sentence-transformers model: minilm, or a local folder. "
                                                 "[default: minilm]", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Texts per encode batch. [default: 128]",
                                                   show_default=False)] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. [default: auto]", show_default=False)] = None,
    samples: Annotated[Path | None, typer.Option(help="Samples folder. [default: RUN/samples]",
                                                 show_default=False)] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts folder. [default: RUN/prompts]",
                                                 show_default=False)] = None,
    greedy_dir: Annotated[Path | None, typer.Option(help="Greedy samples folder, embedded when present. "
                                                    "[default: RUN/greedy]", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder. [default: RUN/embeddings]",
                                             show_default=False)] = None,
    run: Run = None, config: ConfigFile = None, seed: Seed = None, overwrite: Overwrite = None, debug: Debug = False,
    shard_index: ShardIndex = None, num_shards: NumShards = None, trust_remote_code: TrustRemoteCode = None,
) -> None:
    """Embed every unique sample, target and given negative (deduplicated by text hash) into RUN/embeddings."""
    _execute("embed", EmbedConfig, config, locals())


@app.command("filter")
def filter_(
    strategy: Annotated[str | None, typer.Option(help="self-contrast (drop the most similar ~25%), random (dedup "
                                                 "only), threshold (keep sim < --max-sim). [default: self-contrast]",
                                                 show_default=False)] = None,
    keep_fraction: Annotated[float | None, typer.Option(help="p in m = min(floor(N*p), n_unique-1). "
                                                        "[default: 0.75]", show_default=False)] = None,
    max_sim: Annotated[float | None, typer.Option(help="Similarity ceiling for --strategy threshold.")] = None,
    drop_truncated: Annotated[bool | None, typer.Option("--drop-truncated", help="Drop samples that hit the "
                                                        "token limit.")] = None,
    near_dup_sim: Annotated[float | None, typer.Option(help="Drop a candidate whose cosine to an earlier kept one "
                                                       "is at least this.")] = None,
    max_neg_sim: Annotated[float | None, typer.Option(help="D2O: drop a self-sample whose cosine to a given "
                                                      "negative is at least this.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Embeddings folder. [default: RUN/embeddings]",
                                                    show_default=False)] = None,
    samples: Annotated[Path | None, typer.Option(help="Samples folder. [default: RUN/samples]",
                                                 show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder. [default: RUN/negatives]",
                                             show_default=False)] = None,
    run: Run = None, config: ConfigFile = None, seed: Seed = None, overwrite: Overwrite = None, debug: Debug = False,
) -> None:
    """Score candidates against the target (FAISS) and keep the dissimilar ones as negatives, into RUN/negatives."""
    _execute("filter", FilterConfig, config, locals())


@app.command()
def pair(
    max_negatives: Annotated[int | None, typer.Option(help="Kept negatives stored per prompt, in seeded random "
                                                      "order (train --num-negatives K takes the first K). "
                                                      "[default: 16]", show_default=False)] = None,
    export_trl: Annotated[Path | None, typer.Option(help="Also write TRL's conversational preference format "
                                                    "(prompt/chosen/rejected, one row per pair) to this Parquet "
                                                    "file.")] = None,
    negatives: Annotated[Path | None, typer.Option(help="Filter output folder. [default: RUN/negatives]",
                                                   show_default=False)] = None,
    samples: Annotated[Path | None, typer.Option(help="Samples folder. [default: RUN/samples]",
                                                 show_default=False)] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts folder. [default: RUN/prompts]",
                                                 show_default=False)] = None,
    greedy_dir: Annotated[Path | None, typer.Option(help="Greedy samples folder, the source of y_ref when present. "
                                                    "[default: RUN/greedy]", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder. [default: RUN/pairs]", show_default=False)] = None,
    run: Run = None, config: ConfigFile = None, seed: Seed = None, overwrite: Overwrite = None, debug: Debug = False,
    shard_index: ShardIndex = None, num_shards: NumShards = None,
) -> None:
    """Build one training group per prompt (chosen + K rejected, anchors, y_ref) into RUN/pairs."""
    _execute("pair", PairConfig, config, locals())


@app.command()
def train(
    objective: Annotated[str | None, typer.Option(help="sft, dpo, ipo, sc, sr-dpo, sr-ipo, selm or d2o. "
                                                  "[default: sc]", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="Starting model. [default: smollm2-135m]",
                                              show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Output name under RUN/models/. [default: the objective]",
                                             show_default=False)] = None,
    num_negatives: Annotated[int | None, typer.Option(help="K: first K negatives of each group. [default: 1]",
                                                      show_default=False)] = None,
    run: Run = None, config: ConfigFile = None, seed: Seed = None, overwrite: Overwrite = None, debug: Debug = False,
) -> None:
    """Train a model on RUN/pairs with a DPO-family objective into RUN/models/NAME."""
    _execute("train", TrainConfig, config, locals())


@app.command("eval")
def eval_(
    model: Annotated[str | None, typer.Option(help="A name under RUN/models/ or a model folder.")] = None,
    run: Run = None, config: ConfigFile = None, seed: Seed = None, overwrite: Overwrite = None, debug: Debug = False,
) -> None:
    """Generate on held-out prompts and score them into RUN/eval/NAME."""
    _execute("eval", EvalConfig, config, locals(), module="evaluate")


@app.command("run")
def run_pipeline(
    pipeline: Annotated[Path, typer.Argument(help="pipeline.yaml: the run directory and one section per stage.")],
    debug: Debug = False,
) -> None:
    """Run every stage of a pipeline file, skipping finished ones."""
    try:
        mod = importlib.import_module("negalign.pipeline")
    except ModuleNotFoundError:
        _fail("'run' is not implemented yet: see the README", 2)
    try:
        mod.run_file(pipeline)
    except NegalignError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A run directory or one stage folder in it.")],
    examples: Annotated[int, typer.Option(help="Example rows to show.")] = 3,
    debug: Debug = False,
) -> None:
    """Show what a run holds: rows per stage, drops by reason, a similarity histogram, examples."""
    from negalign import inspection

    try:
        inspection.show(path, examples=examples)
    except NegalignError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)


@app.command()
def env() -> None:
    """Versions of Python, torch, transformers, vllm, faiss, sentence-transformers, peft; devices; default models."""
    from negalign import environment

    environment.show()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"negalign {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version.")] = False) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(app())
