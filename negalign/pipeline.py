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
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from negalign import store
from negalign.config import STAGES, Common, load_yaml, opt, resolve, validate
from negalign.console import console
from negalign.errors import NegalignError, UsageError
from negalign.threads import default_threads

PIPELINE_KEYS = {"run", "seed", "vars", "defaults", "steps", "report"}
STEP_KEYS = {"name", "stage", "after", "eval"}
BLOCK_KEYS = {"name", "iterations", "steps", "model", "reference", "prompts", "prompts_per_round", "eval", "after"}
INTERNAL = {"slice", "rank"}  # pipeline-only stages, run in this process
# Options that do not change a stage's output: never fingerprinted. SOFT: a change the stage resumes by itself.
IGNORED = {"overwrite", "debug", "verbose", "threads"}
SOFT = {"num_samples", "batch_size", "shard_index", "num_shards"}
SWEEP_ABBREV = {"num_negatives": "k", "seed": "s", "learning_rate": "lr", "beta": "b", "lam": "lam",
                "alpha": "a", "sft_weight": "sw", "epochs": "e", "max_steps": "steps"}
STATE_DIR = "_pipeline"


# ----------------------------------------------------------------------------------------------- internal stages

@dataclass
class SliceConfig(Common):
    """Write prompts[start:stop] (in prompt_id order, shuffled by seed) as a prompts artifact."""

    prompts: str | None = opt(None, "Prompts folder. [default: RUN/prompts]")
    out: str | None = opt(None, "Output folder. [default: RUN/STEP_NAME]")
    start: int = opt(0, "First prompt of the slice.", min=0)
    stop: int | None = opt(None, "End of the slice (exclusive).", min=0)
    count: int | None = opt(None, "Prompts in the slice: stop = start + count.", min=0)


@dataclass
class RankConfig(Common):
    """SELM: rank {target, y_ref, first rejected}; chosen = best, rejected = worst (SPEC §1.3)."""

    pairs: str | None = opt(None, "Pairs folder. [default: RUN/pairs]")
    embeddings: str | None = opt(None, "Embeddings folder. [default: RUN/embeddings]")
    out: str | None = opt(None, "Output folder. [default: RUN/pairs_ranked]")
    reward_model: str | None = opt(None, "An HF sequence-classification model. [default: similarity to the target]")


INTERNAL_CONFIGS = {"slice": SliceConfig, "rank": RankConfig}


# ----------------------------------------------------------------------------------------------- the plan

@dataclass
class Step:
    name: str
    stage: str
    options: dict[str, Any]
    after: list[str] = field(default_factory=list)
    cfg: Any = None
    outputs: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)  # folders/files read (existing or made by another step)
    optional_inputs: list[Path] = field(default_factory=list)  # read only when present (RUN/greedy)
    deps: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        """What the step's output depends on (fingerprinted)."""
        values = dataclasses.asdict(self.cfg)
        return {k: v for k, v in values.items() if k not in IGNORED}


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


def _config_class(stage: str) -> type:
    if stage in INTERNAL_CONFIGS:
        return INTERNAL_CONFIGS[stage]
    if stage == "report" and "report" not in STAGES:
        raise UsageError("stage 'report' is not available yet")
    return STAGES[stage].config


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
                elif scope in STAGES or scope in INTERNAL or scope in names_in_yaml:
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
        self._resolve()
        self.steps = self._order()

    # ------------------------------------------------------------------------------------------- expansion

    def _expand_step(self, raw: dict[str, Any], *, run: Path, prefix: str = "", fixed: dict[str, Any] | None = None,
                     after: list[str] | None = None) -> list[Step]:
        stage = raw.get("stage")
        if stage is None:
            raise UsageError(f"{self.path}: step {raw.get('name', raw)!r} has no 'stage'")
        if stage not in STAGES and stage not in INTERNAL and stage != "report":
            known = ", ".join([*STAGES, *sorted(INTERNAL), "report"])
            raise UsageError(f"{self.path}: step '{raw.get('name', stage)}': unknown stage '{stage}' (known: {known})")
        cls = _config_class(stage)
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

    # ------------------------------------------------------------------------------------------- paths

    def _ref(self, value: str, step: Step) -> str:
        """`@NAME` → NAME's first output (a step of the same round first)."""
        target = value[1:]
        prefix = step.name.rsplit("/", 1)[0] + "/" if "/" in step.name else ""
        by_name = {s.name: s for s in self.steps}
        for candidate in (prefix + target, target):
            if candidate in by_name:
                if candidate not in step.deps:
                    step.deps.append(candidate)
                return str(self._outputs(by_name[candidate])[0])
        raise UsageError(f"{self.path}: step '{step.name}': '{value}' names no step")

    def _resolve(self) -> None:
        for step in self.steps:
            options = {k: (self._ref(v, step) if isinstance(v, str) and v.startswith("@") else v)
                       for k, v in step.options.items()}
            if step.stage in INTERNAL:
                cls = INTERNAL_CONFIGS[step.stage]
                try:
                    step.cfg = validate(cls(**options), f"{self.path}: step '{step.name}'")
                except TypeError as e:
                    raise UsageError(f"{self.path}: step '{step.name}': {e}") from e
            else:
                step.cfg = resolve(_config_class(step.stage), step.stage, {}, options,
                                   source=f"{self.path}: step '{step.name}'")
            step.outputs = self._outputs(step)
        for step in self.steps:
            step.inputs, step.optional_inputs = self._inputs(step)
        producers: dict[Path, str] = {}
        for step in self.steps:
            for out in step.outputs:
                if out in producers:
                    raise UsageError(f"{self.path}: steps '{producers[out]}' and '{step.name}' both write {out}")
                producers[out] = step.name
        for step in self.steps:
            for path in [*step.inputs, *step.optional_inputs]:
                owner = producers.get(path)
                if owner and owner != step.name and owner not in step.deps:
                    step.deps.append(owner)
            for name in step.after:
                if name not in producers.values():
                    raise UsageError(f"{self.path}: step '{step.name}': after '{name}' names no step")
                if name not in step.deps:
                    step.deps.append(name)
            if step.stage == "report":
                step.deps += [s.name for s in self.steps if s.stage == "eval" and s.name not in step.deps
                              and Path(s.options["run"]) == Path(step.options["run"])]

    def _outputs(self, step: Step) -> list[Path]:
        o, run = step.options, Path(step.options["run"])

        def at(key: str, default: str) -> Path:
            return absolute_path(o.get(key) or run / default)

        if step.stage == "prepare":
            outs = [absolute_path(run / "prompts")]
            test = o.get("test_fraction") or 0
            return outs + ([absolute_path(run / "prompts_test")] if float(test) > 0 else [])
        if step.stage == "sample":
            return [at("out", "greedy" if o.get("greedy") else "samples")]
        if step.stage == "train":
            return [at("out", f"models/{o.get('name') or o.get('objective') or 'sc'}")]
        if step.stage == "eval":
            return [at("out", f"eval/{o.get('name') or Path(str(o.get('model'))).name}")]
        default = {"embed": "embeddings", "filter": "negatives", "pair": "pairs", "report": "report",
                   "slice": "prompts", "rank": "pairs_ranked"}[step.stage]
        return [at("out", default)]

    def _inputs(self, step: Step) -> tuple[list[Path], list[Path]]:
        cfg, run = step.cfg, Path(step.options["run"])

        def at(key: str, default: str) -> Path:
            value = getattr(cfg, key, None)
            return absolute_path(value or run / default)

        need: dict[str, list[tuple[str, str]]] = {
            "sample": [("prompts", "prompts")], "embed": [("samples", "samples"), ("prompts", "prompts")],
            "filter": [("embeddings", "embeddings"), ("samples", "samples")],
            "pair": [("negatives", "negatives"), ("samples", "samples"), ("prompts", "prompts")],
            "train": [("pairs", "pairs" if getattr(cfg, "objective", "") != "sft" or self._made(run / "pairs")
                       else "prompts")],
            "eval": [("prompts", "prompts_test")], "slice": [("prompts", "prompts")],
            "rank": [("pairs", "pairs"), ("embeddings", "embeddings")],
        }
        inputs = [at(k, d) for k, d in need.get(step.stage, [])]
        if step.stage == "filter" and getattr(cfg, "prompts", None):  # else the embeddings' own prompts
            inputs.append(absolute_path(cfg.prompts))
        optional = [at("greedy_dir", "greedy")] if step.stage in ("embed", "pair") else []
        if step.stage == "train" and cfg.objective != "sft":
            optional.append(at("samples", "samples"))  # the chat template recorded by sample
        if step.stage == "prepare" and cfg.input:
            inputs.append(absolute_path(cfg.input))
        for key in ("model", "ref_model", "reward_model", "pairs"):
            value = getattr(cfg, key, None)
            if step.stage in ("train", "rank") and key == "pairs":
                continue
            if step.stage == "eval" and key == "pairs" and value:
                inputs.append(absolute_path(value))
                continue
            if isinstance(value, str) and value:
                for candidate in (absolute_path(value), absolute_path(run / "models" / value)):
                    if self._made(candidate):
                        inputs.append(candidate)
                        break
        return list(dict.fromkeys(inputs)), optional

    def _made(self, path: Path) -> bool:
        """Whether some step writes `path`, or it exists already."""
        path = absolute_path(path)
        return path.exists() or any(path in s.outputs for s in self.steps)

    def _order(self) -> list[Step]:
        """Topological order, YAML order among ready steps; a cycle is a usage error."""
        by_name = {s.name: s for s in self.steps}
        done: list[Step] = []
        placed: set[str] = set()
        remaining = list(self.steps)
        while remaining:
            ready = next((s for s in remaining if all(d in placed for d in s.deps)), None)
            if ready is None:
                raise UsageError(f"{self.path}: the steps form a cycle: {_cycle(remaining, by_name)}")
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


def absolute_path(path: str | Path) -> Path:
    """Absolute and collapsed: the key steps are matched on (store's lexical `_norm` keeps paths relative for
    messages; here `runs/x` and `/cwd/runs/x` must be one folder)."""
    return Path(os.path.normpath(os.path.abspath(path)))


# ----------------------------------------------------------------------------------------------- state

def _manifest_dir(path: Path) -> Path:
    """Where a step output's manifest lives: the folder itself, or for an eval folder its scores/."""
    return path / "scores" if store.read_manifest(path) is None and (path / "scores").is_dir() else path


def path_fingerprint(path: Path) -> str | None:
    """A complete stage output: its manifest fingerprint; a file: its sha256; another folder: names, sizes and
    modification times of its files; None when missing."""
    path = _manifest_dir(Path(path))
    if path.is_dir():
        manifest = store.read_manifest(path)
        if manifest is not None:
            return manifest.get("fingerprint") if manifest.get("status") == "complete" else None
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return store.fingerprint([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    if path.is_file():
        return store.sha256_file(path)[:16]
    return None


class State:
    """RUN/_pipeline/state.json: per step, the options, input fingerprints and output fingerprints it ran with."""

    def __init__(self, run: Path) -> None:
        self.file = Path(run) / STATE_DIR / "state.json"
        self.steps: dict[str, Any] = {}
        if self.file.exists():
            try:
                self.steps = json.loads(self.file.read_text()).get("steps", {})
            except ValueError:
                self.steps = {}

    def record(self, step: Step) -> None:
        self.steps[step.name] = {"stage": step.stage, "config": step.config,
                                 "config_fingerprint": store.fingerprint(step.config),
                                 "inputs": {str(p): path_fingerprint(p) for p in _present_inputs(step)},
                                 "outputs": {str(p): path_fingerprint(p) for p in step.outputs},
                                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        store.atomic_write_json(self.file, {"steps": self.steps})

    def status(self, step: Step) -> tuple[str, str]:
        """(state, detail): done, missing, unfinished, config changed, input changed, output changed, not recorded."""
        for out in map(_manifest_dir, step.outputs):
            manifest = store.read_manifest(out) if out.is_dir() else None
            if manifest is None:
                return "missing", ""
            if manifest.get("status") != "complete":
                return "unfinished", "the stage resumes it"
        rec = self.steps.get(step.name)
        if rec is None:
            return "not recorded", "outputs exist; the stage checks them"
        if rec["config_fingerprint"] != store.fingerprint(step.config):
            old, new = rec["config"], step.config
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            return "config changed", "; ".join(diff)
        now = {str(p): path_fingerprint(p) for p in _present_inputs(step)}
        if now != rec["inputs"]:
            changed = [Path(p).name for p in set(now) | set(rec["inputs"]) if now.get(p) != rec["inputs"].get(p)]
            return "input changed", ", ".join(sorted(changed))
        if {str(p): path_fingerprint(p) for p in step.outputs} != rec["outputs"]:
            return "output changed", "rewritten since the pipeline made it"
        return "done", ""

    def soft_change(self, step: Step) -> bool:
        """Only options the stage resumes by itself changed (e.g. a larger num_samples tops up)."""
        rec = self.steps.get(step.name)
        if rec is None:
            return False
        old, new = rec["config"], step.config
        return all(k in SOFT for k in set(old) | set(new) if old.get(k) != new.get(k))


def _present_inputs(step: Step) -> list[Path]:
    return [*step.inputs, *(p for p in step.optional_inputs if p.exists())]


# ----------------------------------------------------------------------------------------------- running

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


def _run_internal(step: Step, overwrite: bool) -> None:
    cfg = dataclasses.replace(step.cfg, overwrite=overwrite)
    try:
        (run_slice if step.stage == "slice" else run_rank)(cfg)
    except NegalignError as e:
        raise type(e)(f"step '{step.name}' ({step.stage}) failed: {e}") from e


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
        if step.stage in INTERNAL:
            _run_internal(step, overwrite)
        else:
            _run_stage(pipe, step, overwrite, threads)
        state.record(step)
        ran += 1
        console.print(f"[green]✓[/] {step.name} ({step.stage}) in {time.time() - t:.1f} s")
    console.print(f"pipeline: {ran} step(s) run, {skipped} already done, {time.time() - t0:.1f} s")
    _report(pipe)


def _report(pipe: Pipeline) -> None:
    """The `report` table at the end, when the report stage exists and some model was evaluated."""
    if pipe.report_options is False or any(s.stage == "report" for s in pipe.steps):
        return
    if not any(s.stage == "eval" for s in pipe.steps) or importlib.util.find_spec("negalign.report") is None:
        return
    options = dict(pipe.report_options) if isinstance(pipe.report_options, dict) else {}
    missing = [a for a in options.get("against") or [] if not (pipe.run / "eval" / a / "summary.json").exists()]
    if missing:  # e.g. after --only: the table without the paired comparison
        console.print(f"report: no paired comparison, {', '.join(missing)} not evaluated yet")
        options.pop("against")
    step = Step("report", "report", {"run": str(pipe.run), "seed": pipe.seed, **options})
    if "report" not in STAGES:
        return
    step.cfg = resolve(STAGES["report"].config, "report", {}, step.options, source=f"{pipe.path}: report")
    _run_stage(pipe, step, overwrite=True)


# ----------------------------------------------------------------------------------------------- slice and rank

def run_slice(cfg: SliceConfig) -> None:
    """prompts[start:stop] in a seeded order: SELM's fresh prompts per round, or a part of a prompt set."""
    src = store.open_stage(absolute_path(cfg.prompts or Path(cfg.run) / "prompts"), "prompts")
    out_dir = absolute_path(cfg.out or Path(cfg.run) / "prompts")
    table = src.read()
    ids = table.column("prompt_id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: store.fingerprint([cfg.seed, ids[i]]))
    stop = cfg.start + cfg.count if cfg.count is not None else cfg.stop
    picked = order[cfg.start:stop]
    if not picked:
        raise UsageError(f"slice [{cfg.start}:{stop}] of {src.path} is empty ({len(ids)} prompts)")
    part = table.take(sorted(picked))
    out = store.StageOutput.open(out_dir, "prompts", {"start": cfg.start, "stop": stop, "seed": cfg.seed},
                                 {"prompts": src.fingerprint}, overwrite=cfg.overwrite)
    if not out.done(0):
        out.write_shard(0, part)
    out.finish(1, summary={"prompts": part.num_rows, "with_target": sum(
        t is not None for t in part.column("target").to_pylist())})
    console.print(f"slice: {part.num_rows} of {len(ids)} prompts -> {out_dir}")


def run_rank(cfg: RankConfig) -> None:
    """SELM's ranking of {target, y_ref, rejected[0]}: chosen = best, rejected = worst (the rest follow).

    Feedback-free default: cosine similarity to the target under the run's embedder (the target is then always
    chosen, and the rejected is whichever of y_ref and the negative is farther from it). With reward_model: the
    reward model's score of each response to the prompt.
    """
    from negalign.embed import embeddings_array, text_sha

    pairs = store.open_stage(absolute_path(cfg.pairs or Path(cfg.run) / "pairs"), "pair")
    out_dir = absolute_path(cfg.out or Path(cfg.run) / "pairs_ranked")
    inputs = {"pairs": pairs.fingerprint}
    vectors: dict[str, np.ndarray] = {}
    if cfg.reward_model is None:
        emb = store.open_stage(absolute_path(cfg.embeddings or Path(cfg.run) / "embeddings"), "embed")
        inputs["embeddings"] = emb.fingerprint
        table = emb.read(["text_sha", "embedding"])
        vectors = dict(zip(table.column("text_sha").to_pylist(), embeddings_array(table), strict=True))
    score = None
    if cfg.reward_model:  # the scorer `eval` uses: same template, same labels, same padding
        from negalign.reward import RewardModel

        model = RewardModel(cfg.reward_model)

        def score(messages: list[dict[str, str]], responses: list[str]) -> list[float]:
            return model.score([messages] * len(responses), responses)
    out = store.StageOutput.open(out_dir, "pair", {"by": cfg.reward_model or "similarity"}, inputs,
                                 overwrite=cfg.overwrite)
    moved = total = 0
    for index, (_, table) in enumerate(pairs.iter_shards()):
        if out.done(index):
            continue
        rows = table.to_pylist()
        for row in rows:
            y_ref, rejected = row.get("y_ref"), list(row["rejected"] or [])
            if not y_ref or not rejected:
                continue
            total += 1
            candidates = [row["chosen"], y_ref, rejected[0]]
            if score is not None:
                scores = score(row["messages"], candidates)
            else:
                target = vectors.get(text_sha(row["chosen"]))
                scores = [1.0] + [float(vectors[text_sha(c)] @ target) if target is not None and text_sha(c) in
                                  vectors else -1.0 for c in candidates[1:]]
            best, worst = int(np.argmax(scores)), int(np.argmin(scores))
            if best == worst:
                continue
            sims = list(row.get("rejected_sim") or [])
            rest = [(r, s) for r, s in zip(rejected, sims + [float("nan")] * len(rejected), strict=False)
                    if r != candidates[worst] and r != candidates[best]]
            row["chosen"] = candidates[best]
            row["rejected"] = [candidates[worst]] + [r for r, _ in rest]
            row["rejected_sim"] = [float(scores[worst])] + [s for _, s in rest]
            moved += worst == 1
        out.write_shard(index, pa.Table.from_pylist(rows, schema=table.schema))
    out.finish(len(pairs.shard_files()), summary={"groups": total, "y_ref_rejected": moved})
    console.print(f"rank ({cfg.reward_model or 'similarity to the target'}): {total} groups, y_ref became the "
                  f"rejected answer in {moved} -> {out_dir}")
