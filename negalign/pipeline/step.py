"""One concrete step of a pipeline: a stage, its options, and what `graph` works out (config, outputs, inputs,
dependencies)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Options that do not change a stage's output: never fingerprinted.
IGNORED = {"overwrite", "debug", "verbose", "threads"}


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
