"""`embed`: sentence-transformers vectors for every candidate, target and given negative (SPEC §1.1 step 2).

Rows (one per text slot, stage "embed"):

- `prompt_id`, `sample_idx`, `source`:
  `source="sample"`   a candidate from RUN/samples, `sample_idx` = its sample index (0..N-1);
  `source="greedy"`   SELM's y_ref from RUN/greedy (if present), `sample_idx` = its index there (0);
  `source="target"`   the prompt's SFT target, `sample_idx = -1`;
  `source="negative"` given negative j of the prompt (D2O input), `sample_idx = -2 - j`.
  Candidates are the rows with `source == "sample"` (a greedy row can share `sample_idx` 0 with one).
- `text_sha`: sha256 (hex) of the UTF-8 text; equal hash = equal text.
- `is_empty`: the text is empty after stripping whitespace (still embedded; `filter` drops it by reason).
- `embedding`: float32, L2-normalised, `fixed_size_list<float32, dim>`; every row carries its vector.

Texts are de-duplicated by hash before encoding: within a shard each unique text is encoded once and its vector
is copied to every row holding it (self-samples repeat a lot). Shard i of the output covers shard i of
RUN/samples; the targets, given negatives and greedy answers of those prompts go in the same shard, so the
stage resumes by shard and splits across workers with `--shard-index/--num-shards` like `sample`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from negalign.config import EmbedConfig
from negalign.console import console, progress
from negalign.errors import UsageError
from negalign.models import best_device, load_embedder, model_fingerprint, model_label, resolve_model
from negalign.schemas import embed_schema
from negalign.stages import output_dir, stage_input
from negalign.store import StageInput, StageOutput, my_shards, open_optional_stage, open_stage
from negalign.threads import set_threads

SOURCES = ("sample", "greedy", "target", "negative")
TARGET_IDX = -1


def negative_idx(j: int) -> int:
    """`sample_idx` of given negative j: -2, -3, …"""
    return -2 - j


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embeddings_array(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The embedding column as a float32 (rows, dim) array (zero-copy where Arrow allows)."""
    col = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(col),
                                                                                                 col.type.list_size)
    return np.asarray(col.to_pylist(), dtype=np.float32)


def embedding_dim(model: Any) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def _shard_slots(samples: pa.Table, prompts: dict[str, dict[str, Any]],
                 greedy: dict[str, list[tuple[int, str]]]) -> list[tuple[str, int, str, str]]:
    """(prompt_id, sample_idx, source, text) for one samples shard: per prompt target, negatives, samples, greedy."""
    by_prompt: dict[str, list[tuple[int, str]]] = {}
    for pid, idx, text in zip(samples.column("prompt_id").to_pylist(), samples.column("sample_idx").to_pylist(),
                              samples.column("text").to_pylist(), strict=True):
        by_prompt.setdefault(pid, []).append((idx, text or ""))
    slots = []
    for pid, rows in by_prompt.items():
        prompt = prompts.get(pid)
        if prompt is None:
            raise UsageError(f"prompt {pid[:12]}… is in the samples but not in the prompts; re-run sample "
                             "(with --overwrite) on these prompts")
        if prompt["target"] is not None:
            slots.append((pid, TARGET_IDX, "target", prompt["target"]))
        for j, neg in enumerate(prompt["negatives"] or []):
            slots.append((pid, negative_idx(j), "negative", neg or ""))
        slots += [(pid, idx, "sample", text) for idx, text in sorted(rows)]
        slots += [(pid, idx, "greedy", text) for idx, text in greedy.get(pid, [])]
    return slots


def _stage_config(cfg: EmbedConfig, resolved: str) -> dict[str, Any]:
    """What the vectors depend on: the embedder (alias and folder name) and normalisation. Batch size and device
    are left out: they change nothing beyond float rounding, so a run can resume on another machine."""
    folder = Path(resolved)
    return {"embedder": model_label(cfg.embedder),
            "embedder_folder": "/".join(folder.parts[-2:]) if folder.is_absolute() else resolved,
            "embedder_fingerprint": model_fingerprint(cfg.embedder), "normalize": True}


def _encode(model: Any, texts: list[str], batch_size: int, bar: Any, task: Any, counter: dict[str, int]) -> np.ndarray:
    """Encode `texts` (longest first, so batches pad little), advancing the bar per chunk; float32, unit norm."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    dim = embedding_dim(model)
    out = np.zeros((len(texts), dim), dtype=np.float32)
    chunk = max(1, batch_size) * 4
    for lo in range(0, len(order), chunk):
        idx = order[lo:lo + chunk]
        vecs = model.encode([texts[i] for i in idx], batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
        vecs = np.asarray(vecs, dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        out[idx] = vecs / np.where(norms > 0, norms, 1.0)  # re-normalise in float32 (half-precision models)
        counter["texts"] += len(idx)
        bar.update(task, advance=len(idx), texts=counter["texts"])
    return out


def run(cfg: EmbedConfig) -> None:
    samples = open_stage(*stage_input(cfg, "samples"))
    prompts_in = open_stage(*stage_input(cfg, "prompts"))
    greedy_in = open_optional_stage(*stage_input(cfg, "greedy_dir"))
    out_dir = output_dir(cfg)

    resolved = resolve_model(cfg.embedder)
    inputs: dict[str, str | StageInput] = {"samples": samples, "prompts": prompts_in}
    if greedy_in is not None:
        inputs["greedy"] = greedy_in
    info = {"embedder": cfg.embedder, "embedder_path": resolved}
    out = StageOutput.open(out_dir, "embed", _stage_config(cfg, resolved), inputs, overwrite=cfg.overwrite,
                           info=info)

    num_shards = samples.num_shards
    plan = [s for s in my_shards(num_shards, cfg.shard_index, cfg.num_shards) if not out.done(s)]
    totals = {"rows": 0, "unique": 0, "texts": 0}
    dim, threads = None, None
    t0 = time.time()
    if plan:
        prompts = {r["prompt_id"]: r for r in prompts_in.read(["prompt_id", "target", "negatives"]).to_pylist()}
        greedy: dict[str, list[tuple[int, str]]] = {}
        if greedy_in is not None:
            for r in greedy_in.read(["prompt_id", "sample_idx", "text"]).to_pylist():
                greedy.setdefault(r["prompt_id"], []).append((r["sample_idx"], r["text"] or ""))
            for rows in greedy.values():
                rows.sort()

        def slots_of(s: int) -> list[tuple[str, int, str, str]]:
            table = samples.read_shard(s, ["prompt_id", "sample_idx", "text"])
            return _shard_slots(table, prompts, greedy)

        # A first cheap pass counts the unique texts for the progress bar; shards are re-read one at a time below.
        todo = sum(len({text_sha(t) for *_, t in slots_of(s)}) for s in plan)
        device = best_device(cfg.device)
        threads = set_threads(cfg.threads) if device == "cpu" else None
        model = load_embedder(cfg.embedder, device=device, trust_remote_code=cfg.trust_remote_code)
        dim = embedding_dim(model)
        out = StageOutput.open(out_dir, "embed", _stage_config(cfg, resolved), inputs, overwrite=False,
                               info={**info, "dim": dim, "max_seq_length": model.max_seq_length})
        t0 = time.time()  # throughput counts encoding, not model loading
        with progress("texts", "texts/s") as bar:
            task = bar.add_task(f"embed → {out_dir}", total=todo, texts=0)
            for s in plan:
                slots = slots_of(s)
                shas = [text_sha(t) for *_, t in slots]
                first: dict[str, int] = {}
                for i, h in enumerate(shas):
                    first.setdefault(h, i)
                unique = list(first)
                vecs = _encode(model, [slots[first[h]][3] for h in unique], cfg.batch_size, bar, task, totals)
                row_of = {h: k for k, h in enumerate(unique)}
                emb = vecs[[row_of[h] for h in shas]] if slots else np.zeros((0, dim), dtype=np.float32)
                table = pa.table({
                    "prompt_id": pa.array([p for p, *_ in slots], pa.string()),
                    "sample_idx": pa.array([i for _, i, *_ in slots], pa.int32()),
                    "source": pa.array([src for _, _, src, _ in slots], pa.string()),
                    "text_sha": pa.array(shas, pa.string()),
                    "is_empty": pa.array([not t.strip() for *_, t in slots], pa.bool_()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
                }, schema=embed_schema(dim))
                out.write_shard(s, table, {"unique_texts": len(unique), "dim": dim,
                                           "sources": {src: sum(x[2] == src for x in slots) for src in SOURCES}})
                totals["rows"] += len(slots)
                totals["unique"] += len(unique)
    elapsed = time.time() - t0
    shards = out.manifest()["shards"]
    all_rows = sum(e["rows"] for e in shards.values())
    all_unique = sum(e["meta"].get("unique_texts", 0) for e in shards.values())
    dims = {e["meta"].get("dim") for e in shards.values()} - {None}
    summary = {"rows": all_rows, "unique_texts_encoded": all_unique,
               "dedup_saved": round(1 - all_unique / all_rows, 4) if all_rows else 0.0,
               "dim": dim if dim is not None else (min(dims) if dims else None),
               "sources": {src: sum(e["meta"].get("sources", {}).get(src, 0) for e in shards.values())
                           for src in SOURCES}}
    timings = {"encode_s": round(elapsed, 2)} | ({"threads": threads} if plan and threads else {})
    complete = out.finish(num_shards, timings=timings, summary=summary)
    rate = totals["texts"] / elapsed if elapsed > 0 and plan else 0.0
    saved = 1 - totals["unique"] / totals["rows"] if totals["rows"] else 0.0
    mine = len(my_shards(num_shards, cfg.shard_index, cfg.num_shards))
    done = (f"{totals['rows']} new rows, {totals['unique']} unique texts encoded (dedup saved {saved:.0%} of "
            f"encodes), {rate:.1f} texts/s" if plan else
            f"nothing to do ({summary['rows']} rows, {summary['unique_texts_encoded']} unique texts)")
    console.print(
        f"embed ({model_label(cfg.embedder)}, dim {summary['dim']}): {done}; shards: {len(plan)} written, "
        f"{mine - len(plan)} already done"
        + ("" if complete else f" (this worker's shards are done; {out_dir} completes when all workers finish)"))
