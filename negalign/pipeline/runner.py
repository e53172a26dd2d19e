"""Running a pipeline: each step as its own `negalign STAGE --config RUN/_pipeline/steps/NAME.yaml` process (the
file stays, so a step can be rerun by hand), skipping done steps; the plan table for --dry-run; the report at the
end. The first failure stops the run with the step's name and the stage's one-line error."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from negalign import store
from negalign.config import STAGES, resolve
from negalign.console import console
from negalign.errors import NegalignError, UsageError
from negalign.pipeline.expand import Pipeline
from negalign.pipeline.state import STATE_DIR, State
from negalign.pipeline.step import Step
from negalign.threads import default_threads


def _run_stage(pipe: Pipeline, step: Step, overwrite: bool, threads: int | None = None) -> None:
    cfg_file = pipe.run / STATE_DIR / "steps" / (step.name.replace("/", "__") + ".yaml")
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(step.cfg).items()}
    options = {k: v for k, v in options.items() if k not in ("overwrite", "debug")}
    if threads and not options.get("threads"):
        options["threads"] = threads
    store.atomic_write_text(cfg_file, yaml.safe_dump({step.stage: options}, sort_keys=False))
    cmd = [sys.executable, "-m", "negalign", step.stage, "--config", str(cfg_file)]
    if overwrite:
        cmd.append("--overwrite")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stderr is not None
    error, last = "", ""
    for line in proc.stderr:  # shown as it comes; the stage's one-line error is kept for the pipeline's message
        sys.stderr.write(line)
        if line.startswith("error:"):
            error = line[len("error:"):].strip()
        elif line.strip():
            last = line.strip()
    proc.wait()
    if proc.returncode != 0:
        err = UsageError if proc.returncode == 2 else NegalignError
        raise err(f"step '{step.name}' ({step.stage}) failed: {error or last or f'exit status {proc.returncode}'}")


def _select(pipe: Pipeline, from_step: str | None, only: str | None) -> list[Step]:
    names = [s.name for s in pipe.steps]
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        chosen = [s for s in pipe.steps if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
        if not chosen:
            raise UsageError(f"--only {only}: no step matches (steps: {', '.join(names)})")
        return chosen
    if from_step:
        if from_step not in names:
            raise UsageError(f"--from {from_step}: no such step (steps: {', '.join(names)})")
        return pipe.steps[names.index(from_step):]
    return pipe.steps


def plan_table(pipe: Pipeline, state: State) -> list[tuple[Step, str, str]]:
    """Each step's state, with 'input changed' for a done step whose upstream is not done."""
    rows, not_done = [], set()
    for step in pipe.steps:
        status, detail = state.status(step)
        waiting = [d for d in step.deps if d in not_done]
        if status == "done" and waiting:
            status, detail = "input changed", f"after {', '.join(waiting)}"
        if status != "done":
            not_done.add(step.name)
        rows.append((step, status, detail))
    return rows


def _print_plan(pipe: Pipeline, rows: list[tuple[Step, str, str]]) -> None:
    from rich.table import Table

    table = Table(title=f"pipeline {pipe.path} -> {pipe.run}", title_justify="left")
    for col in ("step", "stage", "state", "output", "detail"):
        table.add_column(col, overflow="fold")
    style = {"done": "green", "missing": "yellow", "unfinished": "yellow"}
    for step, status, detail in rows:
        out = step.outputs[0]
        shown = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else str(out)
        table.add_row(step.name, step.stage, f"[{style.get(status, 'red')}]{status}[/]", shown, detail)
    console.print(table)


def run_file(path: Path, *, dry_run: bool = False, from_step: str | None = None, only: str | None = None,
             overrides: list[str] | None = None) -> None:
    """Run (or with dry_run, describe) every step of a pipeline file, skipping finished ones; then the report."""
    if overrides is None and os.environ.get("NEGALIGN_SET"):
        overrides = [s for s in os.environ["NEGALIGN_SET"].split(";") if s.strip()]
    pipe = Pipeline(Path(path), overrides)
    state = State(pipe.run)
    if pipe.variables:
        shown = {k: v for k, v in pipe.variables.items() if k != "run"}
        if shown:
            console.print("sizes: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    rows = plan_table(pipe, state)
    if dry_run:
        _print_plan(pipe, rows)
        return
    selected = {s.name for s in _select(pipe, from_step, only)}
    if from_step:
        early = [(s.name, st) for s, st, _ in rows if s.name not in selected and st != "done"]
        if early:
            raise UsageError(f"--from {from_step}: earlier step '{early[0][0]}' is not done ({early[0][1]}); "
                             "run without --from first")
    # Chosen once, now: a step that starts right after another would see that step's load in the load average
    # and take fewer threads (threads.py), though the steps run one at a time.
    threads = default_threads()
    console.print(f"threads: {threads} for the CPU paths of every step (steps may set their own)")
    t0 = time.time()
    ran = skipped = 0
    for step in pipe.steps:
        if step.name not in selected:
            continue
        status, detail = state.status(step)
        if status == "done":
            skipped += 1
            console.print(f"[green]✓[/] {step.name} ({step.stage}): done, skipped")
            continue
        overwrite = status in ("config changed", "input changed", "output changed") and not (
            status == "config changed" and state.soft_change(step))
        console.rule(f"{step.name} ({step.stage}): {status}{' — ' + detail if detail else ''}")
        t = time.time()
        _run_stage(pipe, step, overwrite, threads)
        state.record(step)
        ran += 1
        console.print(f"[green]✓[/] {step.name} ({step.stage}) in {time.time() - t:.1f} s")
    console.print(f"pipeline: {ran} step(s) run, {skipped} already done, {time.time() - t0:.1f} s")
    _report(pipe)


def _report(pipe: Pipeline) -> None:
    """The `report` table at the end, when some model was evaluated."""
    from negalign.report import compare_pair

    if pipe.report_options is False or any(s.stage == "report" for s in pipe.steps):
        return
    if not any(s.stage == "eval" for s in pipe.steps):
        return
    options = dict(pipe.report_options) if isinstance(pipe.report_options, dict) else {}
    def evaluated(name: str) -> bool:
        return (pipe.run / "eval" / name / "summary.json").exists()

    missing = [a for a in options.get("against") or [] if not evaluated(a)]
    if missing:  # e.g. after --only: the table without the paired comparison
        console.print(f"report: no paired comparison, {', '.join(missing)} not evaluated yet")
        options.pop("against")
    if options.get("compare"):
        ready = [c for c in options["compare"] if all(evaluated(n) for n in compare_pair(c))]
        if len(ready) < len(options["compare"]):
            console.print(f"report: {len(options['compare']) - len(ready)} --compare pair(s) left out, not evaluated "
                          "yet")
        options["compare"] = ready
    step = Step("report", "report", {"run": str(pipe.run), "seed": pipe.seed, **options})
    step.cfg = resolve(STAGES["report"].config, "report", {}, step.options, source=f"{pipe.path}: report")
    _run_stage(pipe, step, overwrite=True)
