"""Stage configs: one dataclass per stage. Values come from defaults, then a YAML file, then command-line flags.

A YAML file may be flat (`temperature: 0.7`) or have one section per stage (`sample: {temperature: 0.7}`);
top-level keys shared by all stages (`run`, `seed`) apply everywhere. Unknown keys are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from negalign.errors import UsageError

COMMON_KEYS = ("run", "seed", "overwrite", "debug", "trust_remote_code")


@dataclass
class Common:
    run: str = "runs/exp"
    seed: int = 0
    overwrite: bool = False
    debug: bool = False
    trust_remote_code: bool = False
    shard_index: int = 0
    num_shards: int = 1  # number of shard-parallel workers (SPEC §4)


@dataclass
class PrepareConfig(Common):
    input: str | None = None
    format: str = "auto"
    prompt_field: str | None = None
    messages_field: str | None = None
    target_field: str | None = None
    negatives_field: str | None = None
    system_prompt: str | None = None
    test_fraction: float = 0.0
    on_bad_row: str = "fail"
    shard_size: int = 10000


@dataclass
class SampleConfig(Common):
    model: str = "smollm2-135m"
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    max_prompt_tokens: int = 1024
    greedy: bool = False
    engine: str = "auto"
    shard_size: int = 64
    batch_size: int = 16
    prompts: str | None = None  # default: RUN/prompts
    out: str | None = None  # default: RUN/samples (RUN/greedy with --greedy)
    gpu_memory_utilization: float = 0.9  # vLLM on a GPU: share of GPU memory for weights + KV cache
    cpu_kv_cache_gb: float = 2.0  # vLLM on the CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE wins when set)
    enforce_eager: bool = True


@dataclass
class EmbedConfig(Common):
    embedder: str = "minilm"
    batch_size: int = 128
    device: str = "auto"
    samples: str | None = None  # default: RUN/samples (output shard i covers samples shard i)
    prompts: str | None = None  # default: RUN/prompts
    greedy_dir: str | None = None  # default: RUN/greedy, embedded when present
    out: str | None = None  # default: RUN/embeddings


@dataclass
class FilterConfig(Common):
    strategy: str = "self-contrast"
    keep_fraction: float = 0.75
    max_sim: float | None = None
    drop_truncated: bool = False
    near_dup_sim: float | None = None
    max_neg_sim: float | None = None
    embeddings: str | None = None  # default: RUN/embeddings
    samples: str | None = None  # default: RUN/samples
    out: str | None = None  # default: RUN/negatives


@dataclass
class PairConfig(Common):
    max_negatives: int = 16
    export_trl: str | None = None
    negatives: str | None = None  # the filter output; default: RUN/negatives
    samples: str | None = None  # default: RUN/samples
    prompts: str | None = None  # default: RUN/prompts
    greedy_dir: str | None = None  # default: RUN/greedy, used for y_ref when present
    out: str | None = None  # default: RUN/pairs


@dataclass
class TrainConfig(Common):
    objective: str = "sc"
    model: str = "smollm2-135m"
    name: str | None = None
    num_negatives: int = 1
    beta: float = 0.1
    lam: float = 0.5
    alpha: float = 0.1
    learning_rate: float = 5e-5
    epochs: int = 1
    batch_size: int = 2
    max_length: int = 256
    lora: bool = True


@dataclass
class EvalConfig(Common):
    model: str = "smollm2-135m"
    max_tokens: int = 64


@dataclass
class RunConfig(Common):
    stages: list[str] = field(default_factory=list)


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


def resolve(cls: type, section: str, yaml_data: dict[str, Any], flags: dict[str, Any], source: str = "config"):
    """defaults <- YAML (top-level common keys, then the `section` block or flat keys) <- flags that were given."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sectioned = isinstance(yaml_data.get(section), dict)
    for key, value in yaml_data.items():
        key_ = key.replace("-", "_")
        if isinstance(value, dict):
            continue  # a section for another stage
        if key_ in names:
            values[key_] = value
        elif not sectioned and key_ not in COMMON_KEYS:
            raise UsageError(f"{source}: unknown key '{key}' for '{section}' (known: {', '.join(sorted(names))})")
    if sectioned:
        for key, value in yaml_data[section].items():
            key_ = key.replace("-", "_")
            if key_ not in names:
                raise UsageError(f"{source}: unknown key '{section}.{key}' (known: {', '.join(sorted(names))})")
            values[key_] = value
    values.update({k: v for k, v in flags.items() if v is not None and k in names})
    try:
        return cls(**values)
    except TypeError as e:
        raise UsageError(f"{source}: {e}") from e


def run_path(cfg: Common, *parts: str) -> Path:
    return Path(cfg.run, *parts)


def stage_path(cfg: Common, override: str | None, name: str) -> Path:
    """A stage folder: the flag's path if given, else RUN/name."""
    return Path(override) if override else run_path(cfg, name)
