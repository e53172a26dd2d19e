"""Crash harness: kill a stage with SIGKILL at a drawn point, re-run it, and compare with an uninterrupted run.

One trial of stage S:
1. copy S's inputs from a base run that was built once (the base run's own output of S is the clean result);
2. run S's CLI in a separate process and SIGKILL it at a point drawn from a seeded RNG: either a named crash
   point of `negalign.faults` (`NEGALIGN_CRASH_AT=name:N`, the N-th time the point is reached, N drawn from the
   number of hits counted in the clean run), or a delay drawn between 0 and the clean run's duration;
3. check what the kill left on disk: the manifest parses, and every shard it lists as complete is there with its
   sha256 (a half-written shard is never taken as complete);
4. in a quarter of the named-point trials, kill the first re-run too (a crash during recovery);
5. re-run S to the end and compare the result with the clean run: the rows of every shard (sorted), the manifest
   without timings and timestamps, and the list of files (no leftover temporary files).

Processes are forked from `zygote.py`, which has imported torch and friends once: a separate process per run,
killed for real, without paying 10-20 s of imports each time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from negalign.store import canonical_json, manifest_file, read_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[3]
ZYGOTE = Path(__file__).with_name("zygote.py")
SIGKILLED = -9
#: manifest keys that legitimately differ between two runs of the same work
VOLATILE = {"timings", "created_at", "updated_at", "written_at", "started_at", "finished_at", "last_run_s"}


# ------------------------------------------------------------------------------------------------ processes

class Zygote:
    """Client of the fork server (zygote.py): `run(args)` runs `negalign ARGS` in a new process."""

    def __init__(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)
        ready = self.proc.stdout.readline()
        assert json.loads(ready) == {"ready": True}, ready

    def run(self, args: list[Any], *, log: Path, env: dict[str, str] | None = None, kill_after: float | None = None,
            count_file: Path | None = None, timeout: float = 600) -> int:
        """Exit code of `negalign ARGS` (negative: killed by that signal); `kill_after` SIGKILLs it after a delay."""
        request = {"args": [str(a) for a in args], "env": env or {}, "log": str(log),
                   "kill_after": timeout if kill_after is None else kill_after,
                   "count_file": str(count_file) if count_file else None}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return answer["returncode"]

    def cli(self, *args: Any, log: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
        """(exit code, everything it printed) of `negalign ARGS` run to the end."""
        log.unlink(missing_ok=True)
        code = self.run(list(args), log=log, env=env)
        return code, log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------ artifacts

def _sorted_rows(files: list[Path]) -> list[str]:
    rows = [canonical_json(r) for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows)


def _is_lock(name: str) -> bool:
    return name.endswith((".lock", ".mutex"))


def snapshot(path: Path, volatile: frozenset[str] = frozenset(), run: Path | None = None) -> dict[str, Any]:
    """What must be equal after crash + resume: sorted rows, manifest minus timings (and `volatile` keys), the files
    present and the sha256 of every other file (JSONL: its records minus `volatile`). A single file: its rows
    (Parquet) or its JSON (minus `volatile`, with `run` written as {run})."""
    path = Path(path)
    drop = VOLATILE | volatile

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in drop}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        if isinstance(obj, str) and run is not None:
            return obj.replace(str(run), "{run}")
        return obj

    if path.suffix == ".parquet":  # a side output such as pair --export-trl
        return {"rows": _sorted_rows([path])}
    if path.suffix == ".json":
        return {"json": strip(json.loads(path.read_text()))}
    mf = manifest_file(path)
    assert mf is not None, f"{path}: no manifest"
    manifest = json.loads(mf.read_text())
    shards = [path / name for name in sorted(manifest["shards"])]
    others: dict[str, Any] = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix != ".parquet" and p != mf and not _is_lock(p.name):
            others[p.name] = ([strip(json.loads(line)) for line in p.read_text().splitlines()]
                              if p.suffix == ".jsonl" else sha256_file(p))
    return {"manifest": strip(manifest), "rows": _sorted_rows(shards), "others": others,
            "files": sorted(p.name for p in path.iterdir() if not _is_lock(p.name))}


def check_consistent(path: Path) -> None:
    """After a kill: the manifest (if any) parses, and every shard it calls complete is intact, those its journals
    add included (what readers and resume see: `read_manifest` folds them in)."""
    mf = manifest_file(path) if Path(path).is_dir() else None
    if mf is None:
        return
    json.loads(mf.read_text())
    manifest = read_manifest(path)
    assert manifest is not None
    for name, entry in manifest["shards"].items():
        if entry.get("status") == "complete":
            assert (path / name).exists(), f"{path / name}: listed complete but missing"
            assert sha256_file(path / name) == entry["sha256"], f"{path / name}: listed complete but damaged"
            pq.read_table(path / name)
    if manifest.get("status") == "complete":
        for name in manifest["shards"]:
            assert manifest["shards"][name]["status"] == "complete"


# ------------------------------------------------------------------------------------------------ trials

@dataclass
class Stage:
    """A stage command as run in the matrix. `{run}` in args is replaced by the trial's run directory."""

    name: str
    args: list[str]
    outputs: list[str]  # folders (or files) under the run directory it writes
    inputs: list[str] = field(default_factory=list)  # what it reads from the base run (copied per trial)
    volatile: frozenset[str] = frozenset()  # manifest/JSON keys that may differ after a resume (besides timings)
    delay_only: bool = False  # kill after a delay only (e.g. `run`, whose steps are processes of their own)
    subs: dict[str, str] = field(default_factory=dict)  # more `{key}` substitutions in args

    def argv(self, run: Path) -> list[str]:
        out = []
        for a in self.args:
            for key, value in {"run": str(run), **self.subs}.items():
                a = a.replace("{" + key + "}", value)
            out.append(a)
        return out

    def snapshot(self, run: Path, out: str) -> dict[str, Any]:
        return snapshot(run / out, self.volatile, run)


@dataclass
class Clean:
    """The uninterrupted run of a stage: its snapshots, its duration, and how often each crash point was hit."""

    snapshots: dict[str, dict[str, Any]]
    seconds: float
    hits: dict[str, int]


def run_clean(zygote: Zygote, stage: Stage, run: Path) -> Clean:
    import time

    count_file = run.parent / f"{stage.name}.hits.json"
    log = run.parent / f"{stage.name}.clean.log"
    start = time.monotonic()
    code = zygote.run(stage.argv(run), log=log, count_file=count_file)
    seconds = time.monotonic() - start
    assert code == 0, f"clean {stage.name} failed ({code}):\n{log.read_text()[-3000:]}"
    hits = json.loads(count_file.read_text())
    if not stage.delay_only:
        assert hits, f"{stage.name} reached no crash point"
    return Clean({o: stage.snapshot(run, o) for o in stage.outputs}, seconds, hits)


def draw_point(rng: random.Random, hits: dict[str, int]) -> str:
    """One moment, uniformly among every time a crash point was reached in the clean run: `name:N`."""
    moments = [f"{p}:{n}" for p in sorted(hits) for n in range(1, hits[p] + 1)]
    return rng.choice(moments)


def trial(zygote: Zygote, stage: Stage, base: Path, clean: Clean, workdir: Path, seed: int,
          point: str | None = None) -> dict[str, Any]:
    """One crash trial; returns what was done (for the report). Fails the test on any difference. `point`
    (`name:N`) kills there instead of at a drawn moment."""
    rng = random.Random(f"{stage.name}:{seed}")
    run = workdir / "run"
    for name in stage.inputs:
        src = base / name
        if src.is_dir():
            shutil.copytree(src, run / name)
        elif src.exists():
            run.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, run / name)
    log = workdir / "log.txt"
    if point is None and (stage.delay_only or rng.random() < 0.25):
        delay = rng.uniform(0.0, 0.7 * clean.seconds)  # the clean run's duration includes the fork and reports
        code = zygote.run(stage.argv(run), log=log, kill_after=delay)
        what = {"kill": f"after {delay:.2f}s", "killed": code == SIGKILLED}
        assert code in (0, SIGKILLED), f"{stage.name} exited {code}:\n{log.read_text()[-3000:]}"
    else:
        point = point or draw_point(rng, clean.hits)
        code = zygote.run(stage.argv(run), log=log, env={"NEGALIGN_CRASH_AT": point})
        what = {"kill": point, "killed": code == SIGKILLED}
        assert code == SIGKILLED, f"{stage.name} with NEGALIGN_CRASH_AT={point} exited {code}, not killed:\n" \
                                  f"{log.read_text()[-3000:]}"
        if rng.random() < 0.25:  # crash again while recovering
            second = draw_point(rng, clean.hits)
            code = zygote.run(stage.argv(run), log=log, env={"NEGALIGN_CRASH_AT": second})
            what["second_kill"] = second
            assert code in (0, SIGKILLED), f"{stage.name} re-run exited {code}:\n{log.read_text()[-3000:]}"
    for out in stage.outputs:
        check_consistent(run / out)
    code = zygote.run(stage.argv(run), log=log)
    assert code == 0, f"{stage.name} resume after {what} exited {code}:\n{log.read_text()[-3000:]}"
    for out in stage.outputs:
        got = stage.snapshot(run, out)
        want = clean.snapshots[out]
        assert got.get("files") == want.get("files"), f"{out} after {what}: files {got.get('files')}"
        assert got.get("rows") == want.get("rows"), f"{out} after {what}: rows differ from the clean run"
        differ = sorted(k for k in {**got.get("others", {}), **want.get("others", {})}
                        if got.get("others", {}).get(k) != want.get("others", {}).get(k))
        assert not differ, f"{out} after {what}: {differ} differ (kept in {workdir})"
        assert got.get("manifest") == want.get("manifest"), f"{out} after {what}: manifest differs"
        assert got.get("json") == want.get("json"), f"{out} after {what}: JSON differs"
    return what


# ------------------------------------------------------------------------------------------------ tiny models

def tiny_model(folder: Path) -> Path:
    """A random 1-layer Llama (hidden 16) with SmolLM2's tokenizer and chat template, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from negalign.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_embedder(folder: Path, dim: int) -> Path:
    """A random 1-layer BERT sentence-transformers folder (mean pooling) of width `dim`, with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from negalign.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(dim)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=2 * dim, max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim,
                                                                  "pooling_mode_mean_tokens": True}))
    return folder
