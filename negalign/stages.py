"""What each stage reads and writes, declared once (SPEC §2).

One `IO` entry per stage: its inputs (config option, default folder under RUN, kind, optional) and its output
(option, default folder, kind, schema). Everything else derives from it:

- the config options: `config.declare(STAGE)` adds a `str | None` option per input and output that carries a
  `help` here, with "[default: RUN/FOLDER]" appended (so the CLI help follows);
- the stages' default paths: `stage_input(cfg, option)` -> (path, kind) for `store.open_stage`, `output_dir(cfg)`;
- the store's messages: `command_of(kind)`, the command that writes a kind of output;
- the pipeline's dependency graph: `pipeline` reads `inputs` and `outputs` of every step from here.

Adding an input to a stage is one `In(...)` line below (plus the code in the stage that reads it). Kinds are the
manifests' `stage` names (prompts, sample, embed, filter, pair, train, eval), or `model` (a model name: a folder,
RUN/models/NAME, or an alias) and `file` (any file or folder). This module imports only the schemas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from negalign import schemas

Get = Callable[[str], Any]  # option name -> its value (a resolved config, or a pipeline step's raw options)


@dataclass(frozen=True)
class In:
    """One input of a stage."""

    option: str  # the config option that names it
    folder: str | None = None  # default folder under RUN; None: no default (read only when given)
    kind: str = "file"
    help: str | None = None  # the option's help; None: the option is declared in config.py itself
    optional: bool = False  # read only when present (RUN/greedy)
    when: Callable[[Get], bool] | None = None  # read only for configs where this holds (train: samples unless sft)
    fallback: tuple[str, Callable[[Get], bool]] | None = None  # (folder, when): used if the default is not made
    default_help: str | None = None  # the "[default: …]" text when it is not RUN/folder


@dataclass(frozen=True)
class Out:
    """The output of a stage."""

    folder: str | Callable[[Get], str]  # default folder under RUN (a function of the options for models/NAME, …)
    kind: str  # the manifest's stage name
    schema: pa.Schema | Callable[..., pa.Schema] | None = None
    option: str | None = "out"  # the option that overrides the folder; None: always the default
    help: str | None = "Output folder."
    default_help: str | None = None
    manifest: str = ""  # sub-folder holding the manifest (eval: scores/), "" for the folder itself
    extra: tuple[tuple[str, Callable[[Get], bool]], ...] = ()  # more folders written: (folder, when)


@dataclass(frozen=True)
class IO:
    inputs: tuple[In, ...]
    output: Out
    reads_all: str = ""  # a kind of output the stage reads every one of in its run (report: every eval/NAME)

    def input(self, option: str) -> In:
        for spec in self.inputs:
            if spec.option == option:
                return spec
        raise KeyError(option)


def model_name(get: Get) -> str:
    """A train output's NAME: --name, else the objective plus -kK for K > 1 negatives (d2o: anchors)."""
    if get("name"):
        return str(get("name"))
    objective = get("objective") or "sc"
    k = int((get("num_anchors") if objective == "d2o" else get("num_negatives")) or 1)
    return objective + (f"-k{k}" if objective != "sft" and k > 1 else "")


def _models_name(get: Get) -> str:
    return f"models/{model_name(get)}"


def _eval_name(get: Get) -> str:
    return f"eval/{get('name') or Path(str(get('model'))).name}"


def _not_sft(get: Get) -> bool:
    return get("objective") != "sft"


STAGE_IO: dict[str, IO] = {
    "prepare": IO(
        inputs=(In("input", kind="file"),),
        output=Out("prompts", "prompts", schemas.PROMPTS_SCHEMA, option=None, help=None,
                   extra=(("prompts_test", lambda get: float(get("test_fraction") or 0) > 0),))),
    "sample": IO(
        inputs=(In("prompts", "prompts", "prompts", "Prompts folder."),
                In("model", kind="model")),
        output=Out(lambda get: "greedy" if get("greedy") else "samples", "sample", schemas.SAMPLE_SCHEMA,
                   default_help="RUN/samples, or RUN/greedy with --greedy")),
    "embed": IO(
        inputs=(In("samples", "samples", "sample", "Samples folder (output shard i covers samples shard i)."),
                In("prompts", "prompts", "prompts", "Prompts folder."),
                In("greedy_dir", "greedy", "sample", "Greedy samples folder, embedded when present.", optional=True)),
        output=Out("embeddings", "embed", schemas.embed_schema)),
    "filter": IO(
        inputs=(In("embeddings", "embeddings", "embed", "Embeddings folder."),
                In("samples", "samples", "sample", "Samples folder."),
                In("prompts", None, "prompts", "Prompts folder, for the targets' text and the task families.",
                   default_help="the prompts the embeddings were made from, else RUN/prompts")),
        output=Out("negatives", "filter", schemas.NEGATIVES_SCHEMA)),
    "pair": IO(
        inputs=(In("negatives", "negatives", "filter", "Filter output folder."),
                In("samples", "samples", "sample", "Samples folder."),
                In("prompts", "prompts", "prompts", "Prompts folder."),
                In("greedy_dir", "greedy", "sample", "Greedy samples folder, the source of y_ref when present.",
                   optional=True)),
        output=Out("pairs", "pair", schemas.PAIR_SCHEMA)),
    "train": IO(
        inputs=(In("pairs", "pairs", "pair", "Input folder: a pair output, or (sft only) a prompts output whose "
                   "targets are the responses.", default_help="RUN/pairs; sft falls back to RUN/prompts",
                   fallback=("prompts", lambda get: not _not_sft(get))),
                In("samples", "samples", "sample", "Samples folder whose recorded chat template is checked "
                   "against the policy's.", optional=True, when=_not_sft),
                In("model", kind="model"),
                In("ref_model", kind="model")),
        output=Out(_models_name, "train", help="Output model folder.", default_help="RUN/models/NAME")),
    "eval": IO(
        inputs=(In("prompts", "prompts_test", "prompts", "Held-out prompts folder."),
                In("model", kind="model"),
                In("ref_model", kind="model"),
                In("reward_model", kind="model"),
                In("pairs", None, "pair")),
        output=Out(_eval_name, "eval", schemas.SCORES_SCHEMA, default_help="RUN/eval/NAME", manifest="scores")),
    "report": IO(inputs=(), output=Out("report", "report"), reads_all="eval"),
    "slice": IO(
        inputs=(In("prompts", "prompts", "prompts", "Prompts folder."),),
        output=Out("prompts", "prompts", schemas.PROMPTS_SCHEMA, default_help="RUN/prompts; in a pipeline "
                                                                              "RUN/STEP_NAME")),
    "rank": IO(
        inputs=(In("pairs", "pairs", "pair", "Pairs folder."),
                In("embeddings", "embeddings", "embed", "Embeddings folder."),
                In("reward_model", kind="model")),
        output=Out("pairs_ranked", "pair", schemas.PAIR_SCHEMA)),
}


# ----------------------------------------------------------------------------------------------- derived


def default_text(spec: In | Out) -> str:
    """The "[default: …]" of an option's help."""
    if spec.default_help:
        return spec.default_help
    return f"RUN/{spec.folder}"


def command_of(kind: str) -> str:
    """The CLI command that writes a kind of output (the first stage declaring it: prompts -> prepare)."""
    return next((name for name, io in STAGE_IO.items() if io.output.kind == kind), kind)


def manifest_subdirs() -> set[str]:
    """Sub-folders that hold an output's manifest instead of the folder itself (eval: scores/)."""
    return {io.output.manifest for io in STAGE_IO.values() if io.output.manifest}


def _getter(cfg: Any) -> Get:
    return lambda name: getattr(cfg, name, None)


def _io(cfg: Any) -> IO:
    return STAGE_IO[type(cfg).stage_name]


def stage_input(cfg: Any, option: str) -> tuple[Path, str]:
    """(folder, kind) of a stage's input: the option's value if given, else RUN/its default folder."""
    spec = _io(cfg).input(option)
    value = getattr(cfg, option)
    if value:
        return Path(value), spec.kind
    if spec.folder is None:
        raise KeyError(f"{option} has no default folder")
    return Path(cfg.run, spec.folder), spec.kind


def output_dir(cfg: Any) -> Path:
    """A stage's output folder: --out if given, else RUN/its default folder."""
    out = _io(cfg).output
    value = getattr(cfg, out.option) if out.option else None
    if value:
        return Path(value)
    folder = out.folder(_getter(cfg)) if callable(out.folder) else out.folder
    return Path(cfg.run, folder)


def output_dirs(cfg: Any) -> list[Path]:
    """Every folder a stage writes: `output_dir`, then the extra ones its options ask for (prompts_test)."""
    get = _getter(cfg)
    return [output_dir(cfg), *(Path(cfg.run, folder) for folder, when in _io(cfg).output.extra if when(get))]
