"""Steps -> a dependency graph and a run order.

Each step's config is resolved (`@STEP` replaced by that step's first output), then its outputs and inputs are
read off the stage declarations (`negalign.stages.STAGE_IO`): an output folder is the option's value or
RUN/default; an input is the option's value or RUN/default (`optional` ones only count when present, `model` inputs
when some step makes them or they exist, `fallback` folders when the default is not made). A step depends on the
step that writes a folder it reads, on `after:` steps, and (for a stage that `reads_all` of a kind) on every step of
its run that writes that kind. Order: topological, YAML order among ready steps; a cycle is a usage error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from negalign.config import STAGES, resolve
from negalign.errors import UsageError
from negalign.pipeline.step import Step
from negalign.stages import STAGE_IO, Out


def absolute_path(path: str | Path) -> Path:
    """Absolute and collapsed: the key steps are matched on (store's lexical `_norm` keeps paths relative for
    messages; here `runs/x` and `/cwd/runs/x` must be one folder)."""
    return Path(os.path.normpath(os.path.abspath(path)))


def _raw_getter(step: Step) -> Callable[[str], Any]:
    """An option of a step before its config is resolved (another step may ask for its output first): the
    step's value, else the stage's default."""
    defaults = {name: f.default for name, f in STAGES[step.stage].config.__dataclass_fields__.items()}
    return lambda name: step.options[name] if name in step.options else defaults.get(name)


def outputs(step: Step) -> list[Path]:
    """Every folder a step writes, from its declared output (`extra` folders when their condition holds)."""
    out: Out = STAGE_IO[step.stage].output
    get, run = _raw_getter(step), Path(step.options["run"])
    folder = out.folder(get) if callable(out.folder) else out.folder
    first = absolute_path((get(out.option) if out.option else None) or run / folder)
    return [first, *(absolute_path(run / extra) for extra, when in out.extra if when(get))]


def inputs(step: Step, made: Callable[[Path], bool]) -> tuple[list[Path], list[Path]]:
    """(inputs, optional inputs) of a resolved step, from its declared inputs."""
    cfg, run = step.cfg, Path(step.options["run"])
    get = lambda name: getattr(cfg, name, None)  # noqa: E731
    found: list[Path] = []
    optional: list[Path] = []
    for spec in STAGE_IO[step.stage].inputs:
        if spec.when is not None and not spec.when(get):
            continue
        value = getattr(cfg, spec.option, None)
        if spec.kind == "model":  # a folder, or a name under RUN/models, when it exists or a step makes it
            if isinstance(value, str) and value:
                for candidate in (absolute_path(value), absolute_path(run / "models" / value)):
                    if made(candidate):
                        found.append(candidate)
                        break
            continue
        if spec.folder is None:  # read only when given
            if value:
                found.append(absolute_path(value))
            continue
        folder = spec.folder
        if spec.fallback is not None and not value and spec.fallback[1](get) and not made(run / folder):
            folder = spec.fallback[0]
        (optional if spec.optional else found).append(absolute_path(value or run / folder))
    return list(dict.fromkeys(found)), optional


def link(path: Path, steps: list[Step]) -> None:
    """Resolve every step's config, outputs, inputs and dependencies (in place)."""
    by_name = {s.name: s for s in steps}

    def ref(value: str, step: Step) -> str:
        """`@NAME` → NAME's first output (a step of the same round first)."""
        target = value[1:]
        prefix = step.name.rsplit("/", 1)[0] + "/" if "/" in step.name else ""
        for candidate in (prefix + target, target):
            if candidate in by_name:
                if candidate not in step.deps:
                    step.deps.append(candidate)
                return str(outputs(by_name[candidate])[0])
        raise UsageError(f"{path}: step '{step.name}': '{value}' names no step")

    for step in steps:
        options = {k: (ref(v, step) if isinstance(v, str) and v.startswith("@") else v)
                   for k, v in step.options.items()}
        step.cfg = resolve(STAGES[step.stage].config, step.stage, {}, options,
                           source=f"{path}: step '{step.name}'")
        step.outputs = outputs(step)

    def made(p: Path) -> bool:
        """Whether some step writes `p`, or it exists already."""
        p = absolute_path(p)
        return p.exists() or any(p in s.outputs for s in steps)

    for step in steps:
        step.inputs, step.optional_inputs = inputs(step, made)
    producers: dict[Path, str] = {}
    for step in steps:
        for out in step.outputs:
            if out in producers:
                raise UsageError(f"{path}: steps '{producers[out]}' and '{step.name}' both write {out}")
            producers[out] = step.name
    for step in steps:
        for p in [*step.inputs, *step.optional_inputs]:
            owner = producers.get(p)
            if owner and owner != step.name and owner not in step.deps:
                step.deps.append(owner)
        for name in step.after:
            if name not in producers.values():
                raise UsageError(f"{path}: step '{step.name}': after '{name}' names no step")
            if name not in step.deps:
                step.deps.append(name)
        kind = STAGE_IO[step.stage].reads_all
        if kind:
            step.deps += [s.name for s in steps if STAGE_IO[s.stage].output.kind == kind and s.name not in step.deps
                          and Path(s.options["run"]) == Path(step.options["run"])]


def order(path: Path, steps: list[Step]) -> list[Step]:
    """Topological order, YAML order among ready steps; a cycle is a usage error."""
    by_name = {s.name: s for s in steps}
    done: list[Step] = []
    placed: set[str] = set()
    remaining = list(steps)
    while remaining:
        ready = next((s for s in remaining if all(d in placed for d in s.deps)), None)
        if ready is None:
            raise UsageError(f"{path}: the steps form a cycle: {_cycle(remaining, by_name)}")
        done.append(ready)
        placed.add(ready.name)
        remaining.remove(ready)
    return done


def _cycle(remaining: list[Step], by_name: dict[str, Step]) -> str:
    left = {s.name for s in remaining}
    path = [remaining[0].name]
    while True:
        nxt = next(d for d in by_name[path[-1]].deps if d in left)
        if nxt in path:
            return " -> ".join(path[path.index(nxt):] + [nxt])
        path.append(nxt)
