"""The `negalign` command line: flags -> a stage config -> `negalign.<module>.run(cfg)`. Nothing else lives here.

The stage commands are generated from the config dataclasses in `config.py` (their fields, defaults, help and
ranges), so an option is declared once.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect as pyinspect
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from negalign import __version__
from negalign.config import STAGES, Stage, load_yaml, resolve
from negalign.errors import NegalignError

app = typer.Typer(
    name="negalign",
    help="Align language models without preference labels: sample many answers, keep the ones far from the "
         "target as negatives, and train with a DPO-family objective (Self-Contrast, Sr-DPO/IPO, SELM, D2O).\n\n"
         "Each stage reads from and writes one folder of a run directory (--run), as Parquet shards plus a "
         "_manifest.json; re-running a stage resumes it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _import_stage(stage: Stage):
    try:
        return importlib.import_module(f"negalign.{stage.module}")
    except ModuleNotFoundError as e:
        raise NegalignError(f"'{stage.name}' needs the package '{e.name}', which is not installed "
                            "(`make install` installs every dependency)") from e


def guarded(debug: bool, work: typing.Callable[[], Any]) -> Any:
    """Run `work`; errors become one line on stderr and an exit code (1 failure, 2 usage), unless --debug."""
    try:
        return work()
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


def execute(stage: Stage, config_file: Path | None, flags: dict[str, Any]) -> Any:
    """Resolve and validate the config (before any work), import the stage module and run it."""
    def work() -> Any:
        cfg = resolve(stage.config, stage.name, load_yaml(config_file), flags, source=str(config_file or "flags"))
        return _import_stage(stage).run(cfg)

    return guarded(bool(flags.get("debug")), work)


# ----------------------------------------------------------------------------------------------- generated commands

def _option(f: dataclasses.Field, annotation: Any) -> pyinspect.Parameter:
    """A typer option for one config field: `--field-name`, its help with the default, `--x/--no-x` for switches."""
    meta = f.metadata
    name = meta.get("flag") or "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind = typing.get_args(annotation)[0] if typing.get_origin(annotation) in (typing.Union, type(int | None)) \
        else annotation
    if kind is bool:
        decls = [name] if default is False else [f"{name}/--no-{name[2:]}"]
    else:
        decls = [name] + ([meta["short"]] if meta.get("short") else [])
    help_text = meta.get("help", "")
    if meta.get("choices"):
        help_text += f" One of: {', '.join(meta['choices'])}."
    if "[default:" not in help_text and kind is not bool:
        help_text += f" [default: {default}]"
    help_text = help_text.replace("[", "\\[")  # rich markup would eat "[default: …]"
    typ = list[str] if typing.get_origin(kind) is list else kind
    return pyinspect.Parameter(f.name, pyinspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[typ | None, typer.Option(*decls, help=help_text,
                                                                            show_default=False)])


def _stage_command(stage: Stage) -> typing.Callable[..., None]:
    hints = typing.get_type_hints(stage.config)
    params = [_option(f, hints[f.name]) for f in dataclasses.fields(stage.config) if f.metadata.get("cli", True)]
    params.append(pyinspect.Parameter("config", pyinspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML file with the same keys as the flags (flat, or one "
                                  "section per stage); flags win.")]))

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
        execute(stage, config_file, flags)

    command.__signature__ = pyinspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = stage.help
    command.__name__ = stage.name
    return command


for _stage in STAGES.values():
    app.command(_stage.name, help=_stage.help)(_stage_command(_stage))


@app.command("run")
def run_pipeline(
    pipeline: Annotated[Path, typer.Argument(help="pipeline.yaml: the run directory and its named steps.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print each step's state (done, missing, config "
                                          "changed, input changed) and run nothing.")] = False,
    from_step: Annotated[str | None, typer.Option("--from", help="Start at this step (earlier ones must be "
                                                  "done).")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only this step.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE: a variable of the file's "
                                                   "vars, run, seed, STAGE.option or STEP.option (repeatable).")
                    ] = None,
    debug: Debug = False,
) -> None:
    """Run a whole experiment from one YAML file, skipping finished steps; ends with the report table."""
    def work() -> Any:
        from negalign.pipeline import run_file

        return run_file(pipeline, dry_run=dry_run, from_step=from_step, only=only, overrides=set_)

    guarded(debug, work)


@app.command("inspect")
def inspect_(
    path: Annotated[Path, typer.Argument(help="A run directory or one stage folder in it.")],
    examples: Annotated[int, typer.Option(help="Example rows to show.")] = 3,
    debug: Debug = False,
) -> None:
    """Show what a run holds: rows per stage, drops by reason, a similarity histogram, damaged shards, examples.
    Exits 1 when a stage folder is damaged, stale or has a broken manifest (a health check for scripts)."""
    from negalign import inspection

    if guarded(debug, lambda: inspection.show(path, examples=examples)):
        raise typer.Exit(1)


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
