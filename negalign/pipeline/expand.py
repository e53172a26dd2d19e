"""Pipeline files -> concrete steps: `${var}` substitution, `--set` overrides, per-stage defaults, sweeps (a list
for a scalar option), `eval:` on train steps, and `iterations:` blocks (RUN/NAME/iter-t, each round sampling from
the previous round's model). What each step reads and writes, and the order, are `graph`'s job."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from negalign.config import STAGES, load_yaml
from negalign.errors import UsageError
from negalign.pipeline.graph import link, order
from negalign.pipeline.step import Step

PIPELINE_KEYS = {"run", "seed", "vars", "defaults", "steps", "report"}
STEP_KEYS = {"name", "stage", "after", "eval"}
BLOCK_KEYS = {"name", "iterations", "steps", "model", "reference", "prompts", "prompts_per_round", "eval", "after"}
SWEEP_ABBREV = {"num_negatives": "k", "seed": "s", "learning_rate": "lr", "beta": "b", "lam": "lam",
                "alpha": "a", "sft_weight": "sw", "epochs": "e", "max_steps": "steps"}


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    """`${name}` → the variable (its own type when it is the whole string), recursively in lists and mappings."""
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(name: str) -> Any:
        if name not in variables:
            raise UsageError(f"{where}: unknown variable '${{{name}}}' (known: {', '.join(sorted(variables))})")
        return variables[name]

    whole = re.fullmatch(r"\$\{(\w+)\}", value)
    if whole:
        return lookup(whole.group(1))
    return re.sub(r"\$\{(\w+)\}", lambda m: str(lookup(m.group(1))), value)


def _parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set {item}: expected KEY=VALUE (a variable, run, seed, STAGE.option or STEP.option)")
        key, value = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(value)))
    return out


def _is_list_field(cls: type, name: str) -> bool:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return "list" in str(f.type)
    return False


def _fill(value: Any, combo: dict[str, Any]) -> Any:
    """`{key}` in a string option → the swept value of key (e.g. out: RUN/pairs-{max_negatives})."""
    if not isinstance(value, str):
        return value
    for key, v in combo.items():
        value = value.replace("{" + key + "}", str(v))
    return value


def _sweep_name(base: str, combo: dict[str, Any]) -> str:
    if "{" in base:
        return _fill(base, combo)
    parts = [f"{SWEEP_ABBREV.get(k, k.replace('_', '-'))}{v}" for k, v in combo.items()]
    return "-".join([base, *parts])


class Pipeline:
    """A parsed pipeline file: concrete steps in run order."""

    def __init__(self, path: Path, overrides: list[str] | None = None) -> None:
        self.path = Path(path)
        data = load_yaml(self.path)
        unknown = set(data) - PIPELINE_KEYS
        if unknown:
            raise UsageError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(PIPELINE_KEYS))})")
        if not isinstance(data.get("steps"), list) or not data["steps"]:
            raise UsageError(f"{path}: 'steps' must be a non-empty list of steps")
        self.variables: dict[str, Any] = dict(data.get("vars") or {})
        self.defaults: dict[str, dict[str, Any]] = copy.deepcopy(data.get("defaults") or {})
        self.report_options: dict[str, Any] | bool = data.get("report", True)
        self.forced: dict[str, dict[str, Any]] = {}  # --set STAGE.key / STEP.key
        top = {"run": data.get("run", "runs/exp"), "seed": data.get("seed", 0)}
        raw_steps = copy.deepcopy(data["steps"])
        names_in_yaml = {s.get("name") or s.get("stage") for s in raw_steps if isinstance(s, dict)}
        for key, value in _parse_set(overrides):
            if key in top:
                top[key] = value
            elif "." in key:
                scope, option = key.split(".", 1)
                if scope == "vars":
                    self.variables[option] = value
                elif scope in STAGES or scope in names_in_yaml:
                    self.forced.setdefault(scope, {})[option] = value
                else:
                    raise UsageError(f"--set {key}: '{scope}' is neither a stage nor a step of {path}")
            elif key in self.variables:
                self.variables[key] = value
            else:
                raise UsageError(f"--set {key}: not a variable of {path} (vars: {', '.join(self.variables)})")
        self.variables = {k: _substitute(v, {**top, **self.variables}, f"{path}: vars") for k, v in
                          self.variables.items()}
        self.run = Path(str(_substitute(top["run"], self.variables, str(path))))
        self.seed = int(top["seed"])
        self.variables.setdefault("run", str(self.run))
        self.defaults = _substitute(self.defaults, self.variables, f"{path}: defaults")
        self.steps: list[Step] = []
        for raw in raw_steps:
            if not isinstance(raw, dict):
                raise UsageError(f"{path}: every step must be a mapping, got {raw!r}")
            raw = _substitute(raw, self.variables, f"{path}: step {raw.get('name', '?')}")
            for step in [raw, *(raw.get("steps") or [] if "iterations" in raw else [])]:
                name = str(step.get("name", "") if isinstance(step, dict) else "")
                if "/" in name or "\\" in name or name.startswith("."):  # names become folders: keep them in RUN
                    raise UsageError(f"{path}: step name {name!r} must be a plain name (no '/', no leading '.')")
            if "iterations" in raw:
                self._expand_block(raw)
            else:
                self._expand_step(raw, run=self.run)
        names = [s.name for s in self.steps]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise UsageError(f"{path}: duplicate step name(s) {', '.join(sorted(dupes))}")
        link(self.path, self.steps)
        self.steps = order(self.path, self.steps)

    # ------------------------------------------------------------------------------------------- expansion

    def _expand_step(self, raw: dict[str, Any], *, run: Path, prefix: str = "", fixed: dict[str, Any] | None = None,
                     after: list[str] | None = None) -> list[Step]:
        stage = raw.get("stage")
        if stage is None:
            raise UsageError(f"{self.path}: step {raw.get('name', raw)!r} has no 'stage'")
        if stage not in STAGES:
            known = ", ".join(STAGES)
            raise UsageError(f"{self.path}: step '{raw.get('name', stage)}': unknown stage '{stage}' (known: {known})")
        cls = STAGES[stage].config
        base = str(raw.get("name") or stage)
        options = {**self.defaults.get(stage, {}),
                   **{k: v for k, v in raw.items() if k not in STEP_KEYS}}
        options.update(self.forced.get(stage, {}))
        options.update(self.forced.get(base, {}))
        known = {f.name for f in dataclasses.fields(cls)}
        for key in list(options):
            if key.replace("-", "_") != key:
                options[key.replace("-", "_")] = options.pop(key)
        bad = [k for k in options if k not in known]
        if bad:
            raise UsageError(f"{self.path}: step '{base}': unknown option(s) {', '.join(bad)} for stage '{stage}'")
        options.setdefault("run", str(run))
        options.setdefault("seed", self.seed)
        options.update(fixed or {})
        swept = {k: v for k, v in options.items() if isinstance(v, list) and not _is_list_field(cls, k)}
        combos = [dict(zip(swept, values, strict=True)) for values in itertools.product(*swept.values())] or [{}]
        made = []
        for combo in combos:
            name = prefix + (_sweep_name(base, combo) if combo else base)
            opts = {k: _fill(v, combo) for k, v in {**options, **combo}.items()}
            if stage == "slice" and not opts.get("out"):
                opts["out"] = str(Path(opts["run"]) / name[len(prefix):].replace("/", "-"))  # RUN/STEP
            if stage in ("train", "eval") and "name" in known and not opts.get("name"):
                opts["name"] = name[len(prefix):].replace("/", "-")  # a round's models live in its own run
            step = Step(name, stage, opts, after=[prefix + a for a in raw.get("after", [])] + (after or []))
            self.steps.append(step)
            made.append(step)
            evals = raw.get("eval")
            if stage == "train" and evals:
                eval_opts = {**self.defaults.get("eval", {}), **(evals if isinstance(evals, dict) else {})}
                eval_opts.update(self.forced.get("eval", {}))
                self._expand_step({"stage": "eval", "name": f"eval-{name}", **eval_opts, "model": f"@{name}"},
                                  run=self.run, fixed={"name": opts["name"], "run": str(self.run)})
        return made

    def _expand_block(self, raw: dict[str, Any]) -> None:
        """iterations: T → RUN/NAME/iter-t, each round sampling from the previous round's model."""
        unknown = set(raw) - BLOCK_KEYS
        if unknown:
            raise UsageError(f"{self.path}: iterative step '{raw.get('name')}': unknown key(s) "
                             f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(BLOCK_KEYS))})")
        name = raw.get("name") or "iter"
        rounds = int(raw["iterations"])
        if rounds < 1:
            raise UsageError(f"{self.path}: step '{name}': iterations must be at least 1")
        inner = raw.get("steps") or []
        if sum(1 for s in inner if s.get("stage") == "train") != 1:
            raise UsageError(f"{self.path}: step '{name}': an iterative step needs exactly one inner train step")
        reference = raw.get("reference", "previous")
        if reference not in ("previous", "start"):
            raise UsageError(f"{self.path}: step '{name}': reference must be 'previous' or 'start'")
        start = str(raw.get("model", "smollm2-135m"))
        pool = raw.get("prompts", str(self.run / "prompts"))
        per_round = raw.get("prompts_per_round")
        current = start
        for t in range(1, rounds + 1):
            run_t = self.run / name / f"iter-{t}"
            prefix = f"{name}/iter-{t}/"
            lo, hi = ((t - 1) * int(per_round), t * int(per_round)) if per_round else (0, None)
            self._expand_step({"stage": "slice", "name": "prompts", "prompts": pool, "start": lo, "stop": hi},
                              run=run_t, prefix=prefix, after=list(raw.get("after", [])))
            for spec in inner:
                spec = dict(spec)
                fixed: dict[str, Any] = {}
                if spec.get("stage") == "sample":
                    fixed["model"] = spec.get("model", current)
                if spec.get("stage") == "train":
                    fixed["model"] = current
                    if reference == "start" and t > 1:
                        fixed["ref_model"] = start
                    spec.pop("eval", None)
                made = self._expand_step(spec, run=run_t, prefix=prefix, fixed=fixed)
                if spec.get("stage") == "train":
                    trained = made[0]
            current = f"@{trained.name}"
            if raw.get("eval"):
                evals = raw["eval"] if isinstance(raw["eval"], dict) else {}
                self._expand_step({"stage": "eval", "name": f"eval-{name}-iter-{t}",
                                   **{**self.defaults.get("eval", {}), **evals}, "model": current},
                                  run=self.run, fixed={"name": f"{name}-iter-{t}"})
