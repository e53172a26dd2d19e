"""Skip state: RUN/_pipeline/state.json records, per step, the options, input fingerprints and output
fingerprints it ran with; a step is done when its outputs are complete and none of these changed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from negalign import store
from negalign.pipeline.step import Step
from negalign.stages import manifest_subdirs

STATE_DIR = "_pipeline"
SOFT = {"num_samples", "batch_size", "shard_index", "num_shards"}  # changes the stage resumes by itself


def _manifest_dir(path: Path) -> Path:
    """Where a step output's manifest lives: the folder itself, or the sub-folder its stage declares (eval:
    scores/)."""
    if store.read_manifest(path) is None:
        for sub in sorted(manifest_subdirs()):
            if (path / sub).is_dir():
                return path / sub
    return path


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
        self.steps: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        if not self.file.exists():
            return {}
        try:
            return json.loads(self.file.read_text()).get("steps", {})
        except ValueError:
            return {}

    def _record(self, name: str) -> dict[str, Any] | None:
        """This step's record: ours, or one another runner on this run directory wrote since we loaded."""
        return self.steps.get(name) or self._read().get(name)

    def record(self, step: Step) -> None:
        self.steps[step.name] = {"stage": step.stage, "config": step.config,
                                 "config_fingerprint": store.fingerprint(step.config),
                                 "inputs": {str(p): path_fingerprint(p) for p in _present_inputs(step)},
                                 "outputs": {str(p): path_fingerprint(p) for p in step.outputs},
                                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        # Two `negalign run --only …` on one run directory at once: each adds its own step to what is on disk now
        # (under a lock), so neither drops the other's records.
        with store.flock(self.file.with_name("state.lock")):
            on_disk = self._read()
            self.steps = {**on_disk, step.name: self.steps[step.name]}
            store.atomic_write_json(self.file, {"steps": self.steps})

    def status(self, step: Step) -> tuple[str, str]:
        """(state, detail): done, missing, unfinished, config changed, input changed, output changed, not recorded."""
        for out in map(_manifest_dir, step.outputs):
            manifest = store.read_manifest(out) if out.is_dir() else None
            if manifest is None:
                return "missing", ""
            if manifest.get("status") != "complete":
                return "unfinished", "the stage resumes it"
        rec = self._record(step.name)
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
        rec = self._record(step.name)
        if rec is None:
            return False
        old, new = rec["config"], step.config
        return all(k in SOFT for k in set(old) | set(new) if old.get(k) != new.get(k))


def _present_inputs(step: Step) -> list[Path]:
    return [*step.inputs, *(p for p in step.optional_inputs if p.exists())]
