"""`embed` and `pair`: hand-built stage outputs (fast, in-process) and one pipeline on the real default models."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negalign import embed as embed_mod
from negalign import pair as pair_mod
from negalign.config import EmbedConfig, PairConfig
from negalign.embed import embeddings_array, text_sha
from negalign.errors import UsageError
from negalign.prepare import prompt_id
from negalign.sample import SAMPLE_SCHEMA
from negalign.store import MANIFEST, PROMPTS_SCHEMA, StageOutput, open_stage, shard_name
from tests.conftest import EXAMPLE_DATA, negalign, write_jsonl

FILTER_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("sim_to_target", pa.float32()),
                           ("rank", pa.int32()), ("kept", pa.bool_()), ("drop_reason", pa.string())])


# ------------------------------------------------------------------------------------------------ helpers
def write_stage(path: Path, stage: str, shards: list[list[dict]], schema: pa.Schema, config: dict | None = None,
                info: dict | None = None) -> None:
    out = StageOutput.open(path, stage, config or {"made_by": "test"}, {}, info=info)
    for s, rows in enumerate(shards):
        out.write_shard(s, pa.Table.from_pylist(rows, schema=schema))
    assert out.finish(len(shards))


def prompt_row(text: str, target: str | None = None, negatives: list[str] | None = None) -> dict:
    messages = [{"role": "user", "content": text}]
    return {"prompt_id": prompt_id(messages), "messages": messages, "target": target, "negatives": negatives}


def sample_rows(pid: str, texts: list[str], model: str = "m") -> list[dict]:
    return [{"prompt_id": pid, "sample_idx": i, "text": t, "num_tokens": 3, "finish_reason": "stop", "seed": i,
             "engine": "hf", "model": model} for i, t in enumerate(texts)]


def read_stage(path: Path, stage: str) -> list[dict]:
    return open_stage(path, stage).read().to_pylist()


# ------------------------------------------------------------------------------------------------ embed
@pytest.fixture
def embed_run(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Two samples shards; repeated texts within and across prompts, an empty sample, given negatives, greedy."""
    run = tmp_path / "run"
    p = [prompt_row("capital of France?", "Paris", None), prompt_row("capital of Japan?", "Tokyo", None),
         prompt_row("how to pick a lock?", None, ["Use a bump key.", "Paris"]),
         prompt_row("2+2?", "4", None)]
    write_stage(run / "prompts", "prompts", [p], PROMPTS_SCHEMA)
    shards = [sample_rows(p[0]["prompt_id"], ["Paris", "Paris", "It is Paris.", "", "Paris"])
              + sample_rows(p[1]["prompt_id"], ["Tokyo", "It is Paris.", "Kyoto", "Tokyo", "Tokyo"]),
              sample_rows(p[2]["prompt_id"], ["I can't help.", "I can't help.", "Use a bump key.", "No.", "No."])
              + sample_rows(p[3]["prompt_id"], ["4", "4", "four", "4", "5"])]
    write_stage(run / "samples", "sample", shards, SAMPLE_SCHEMA, info={"num_samples": 5})
    write_stage(run / "greedy", "sample", [[r | {"sample_idx": 0} for r in sample_rows(x["prompt_id"], ["Paris"])]
                                           for x in p], SAMPLE_SCHEMA, info={"num_samples": 1})
    return run, p


def test_embed_dedups_and_writes_unit_vectors(embed_run, monkeypatch) -> None:
    run, prompts = embed_run
    encoded: list[str] = []
    real_load = embed_mod.load_embedder

    def counting_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        real_encode = model.encode

        def encode(texts, **kw):
            encoded.extend(texts)
            return real_encode(texts, **kw)

        model.encode = encode
        return model

    monkeypatch.setattr(embed_mod, "load_embedder", counting_load)
    embed_mod.run(EmbedConfig(run=str(run), batch_size=4))

    stage = open_stage(run / "embeddings", "embed", verify=True)
    assert len(stage.shard_files()) == 2
    for f, table in stage.iter_shards():
        t = table.schema.field("embedding").type
        assert pa.types.is_fixed_size_list(t) and t.list_size == 384 and pa.types.is_float32(t.value_type)
        vec = embeddings_array(table)
        assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
        # The same text has the same vector on every row that holds it.
        by_sha: dict[str, np.ndarray] = {}
        for sha, v in zip(table["text_sha"].to_pylist(), vec, strict=True):
            assert np.array_equal(by_sha.setdefault(sha, v), v)
        meta = stage.manifest["shards"][f.name]["meta"]
        assert meta["unique_texts"] == len(by_sha)

    rows = stage.read().drop(["embedding"]).to_pylist()
    # Each unique text of a shard was encoded once: shard 0 and shard 1 each encode their own distinct texts.
    expected = [sorted({text_sha(t) for t in texts}) for texts in (
        ["Paris", "Tokyo", "It is Paris.", "", "Kyoto"],
        ["Use a bump key.", "I can't help.", "No.", "4", "four", "5", "Paris"])]
    assert Counter(map(text_sha, encoded)) == Counter(h for shard in expected for h in shard)
    summary = stage.manifest["summary"]
    assert summary["rows"] == len(rows) == 20 + 3 + 2 + 4  # samples + targets + given negatives + greedy
    assert summary["unique_texts_encoded"] == len(encoded) == 12
    assert summary["dim"] == stage.manifest["info"]["dim"] == 384
    assert stage.manifest["config"]["embedder"] == "minilm" and stage.manifest["config"]["embedder_folder"]
    assert set(stage.manifest["inputs"]) == {"samples", "prompts", "greedy"}

    key = {(r["prompt_id"], r["source"], r["sample_idx"]): r for r in rows}
    d2o = prompts[2]["prompt_id"]
    assert key[(d2o, "negative", -2)]["text_sha"] == text_sha("Use a bump key.")
    assert key[(d2o, "negative", -3)]["text_sha"] == text_sha("Paris")
    assert (d2o, "target", -1) not in key
    assert key[(prompts[0]["prompt_id"], "target", -1)]["text_sha"] == text_sha("Paris")
    assert key[(prompts[0]["prompt_id"], "sample", 3)]["is_empty"]
    assert key[(prompts[3]["prompt_id"], "greedy", 0)]["text_sha"] == text_sha("Paris")
    assert sum(r["source"] == "greedy" for r in rows) == 4


def test_embed_resumes_and_refuses_config_change(embed_run, tmp_path: Path) -> None:
    run, _ = embed_run
    out = run / "embeddings"
    # Two shard-parallel workers: the output completes when the second one finishes.
    embed_mod.run(EmbedConfig(run=str(run), shard_index=1, num_shards=2))
    partial = json.loads((out / MANIFEST).read_text())
    assert partial["status"] == "running" and list(partial["shards"]) == [shard_name(1)]
    embed_mod.run(EmbedConfig(run=str(run), shard_index=0, num_shards=2))
    assert open_stage(out, "embed").num_rows == 29
    manifest = json.loads((out / MANIFEST).read_text())
    (out / shard_name(1)).write_bytes(b"corrupt")  # a damaged shard is redone, the intact one is kept
    mtime0 = (out / shard_name(0)).stat().st_mtime_ns
    embed_mod.run(EmbedConfig(run=str(run)))
    after = json.loads((out / MANIFEST).read_text())
    assert (out / shard_name(0)).stat().st_mtime_ns == mtime0
    assert after["shards"][shard_name(0)]["written_at"] == manifest["shards"][shard_name(0)]["written_at"]
    assert after["fingerprint"] == manifest["fingerprint"]  # same texts, same vectors
    open_stage(out, "embed", verify=True)

    # Another embedder (here: the same weights through a copied folder) is refused without --overwrite.
    folder = Path(embed_mod.resolve_model("minilm"))
    other = tmp_path / "my-embedder"
    shutil.copytree(folder, other)
    with pytest.raises(UsageError, match="another config"):
        embed_mod.run(EmbedConfig(run=str(run), embedder=str(other)))
    embed_mod.run(EmbedConfig(run=str(run), embedder=str(other), overwrite=True))
    assert open_stage(out, "embed").config["embedder"] == "my-embedder"


# ------------------------------------------------------------------------------------------------ pair
@pytest.fixture
def pair_run(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """Prompts of every kind with a hand-built filter output (no model needed)."""
    run = tmp_path / "run"
    p = {"many": prompt_row("name 20 things", "target A"),
         "none_kept": prompt_row("say hi", "hi"),
         "no_target": prompt_row("no target here"),
         "d2o": prompt_row("be harmful", None, ["bad 1", "bad 2"]),
         "given_only": prompt_row("pick", "good", ["given bad"])}
    write_stage(run / "prompts", "prompts", [list(p.values())], PROMPTS_SCHEMA)
    texts = {"many": [f"thing {i}" for i in range(20)], "none_kept": ["hi", "hi", ""],
             "no_target": ["x", "y"], "d2o": ["", "refuse", "refuse", "bad 1!", "sure, here", "no way"],
             "given_only": ["good", "good"]}
    samples = [r for k in p for r in sample_rows(p[k]["prompt_id"], texts[k])]
    write_stage(run / "samples", "sample", [samples[:20], samples[20:]], SAMPLE_SCHEMA)
    write_stage(run / "greedy", "sample", [sample_rows(x["prompt_id"], [f"greedy {k}"]) for k, x in p.items()],
                SAMPLE_SCHEMA)
    rows = []
    for i in range(20):  # "many": the two most similar are dropped, 18 kept
        rows.append((p["many"], i, i / 20, 19 - i, i < 18, None if i < 18 else "near_target"))
    rows += [(p["none_kept"], 0, 0.9, 0, False, "near_target"), (p["none_kept"], 1, 0.9, -1, False, "duplicate"),
             (p["none_kept"], 2, 0.1, -1, False, "empty")]
    rows += [(p["d2o"], 0, None, -1, False, "empty"), (p["d2o"], 1, None, 0, True, None),
             (p["d2o"], 2, None, -1, False, "duplicate"), (p["d2o"], 3, None, -1, False, "near_negative"),
             (p["d2o"], 4, None, 1, True, None), (p["d2o"], 5, None, 2, False, "near_target")]
    rows += [(p["given_only"], 0, 0.99, 0, False, "near_target"), (p["given_only"], 1, 0.99, -1, False, "duplicate")]
    rows += [(p["given_only"], -1, 1.0, -1, False, "target")]  # a filter may list other rows: pair ignores them
    first_shard = {r["prompt_id"] for r in samples[:20]}  # the filter writes shard i for samples shard i
    write_stage(run / "negatives", "filter", [[
        {"prompt_id": x["prompt_id"], "sample_idx": i, "sim_to_target": s, "rank": r, "kept": k, "drop_reason": d}
        for x, i, s, r, k, d in rows if (x["prompt_id"] in first_shard) == (shard == 0)] for shard in (0, 1)],
        FILTER_SCHEMA)
    return run, p


def test_pair_groups(pair_run) -> None:
    run, p = pair_run
    pair_mod.run(PairConfig(run=str(run)))
    stage = open_stage(run / "pairs", "pair", verify=True)
    groups = {g["prompt_id"]: g for g in stage.read().to_pylist()}
    assert set(groups) == {p[k]["prompt_id"] for k in ("many", "d2o", "given_only")}
    assert stage.manifest["summary"]["skipped"] == {"no_target": 1, "no_negatives": 1}

    many = groups[p["many"]["prompt_id"]]
    assert many["chosen"] == "target A" and many["messages"] == p["many"]["messages"]
    assert len(many["rejected"]) == 16 and many["num_kept"] == 18
    assert set(many["rejected_idx"]) <= set(range(18)) and len(set(many["rejected_idx"])) == 16
    assert many["rejected"] == [f"thing {i}" for i in many["rejected_idx"]]
    assert many["rejected_sim"] == pytest.approx([i / 20 for i in many["rejected_idx"]])
    assert many["rejected_idx"] != sorted(many["rejected_idx"])  # shuffled, not in sample order
    assert many["anchors"] == [] and many["negatives"] == [] and many["y_ref"] == "greedy many"

    d2o = groups[p["d2o"]["prompt_id"]]
    assert d2o["chosen"] is None and d2o["rejected"] == [] and d2o["negatives"] == ["bad 1", "bad 2"]
    assert d2o["anchors"] == ["refuse", "sure, here", "no way"]  # unique, non-empty, not near a given negative
    given = groups[p["given_only"]["prompt_id"]]
    assert given["rejected"] == [] and given["negatives"] == ["given bad"]

    shutil.rmtree(run / "greedy")  # without RUN/greedy there is no y_ref
    pair_mod.run(PairConfig(run=str(run), out=str(run / "no_greedy")))
    assert {g["y_ref"] for g in read_stage(run / "no_greedy", "pair")} == {None}


def test_pair_nested_orders_seed_and_resume(pair_run) -> None:
    run, p = pair_run
    orders = {}
    for k in (1, 2, 4, 8, 16):
        pair_mod.run(PairConfig(run=str(run), max_negatives=k, out=str(run / f"pairs{k}")))
        g = {r["prompt_id"]: r for r in read_stage(run / f"pairs{k}", "pair")}[p["many"]["prompt_id"]]
        orders[k] = g["rejected_idx"]
    for k in (1, 2, 4, 8):
        assert orders[16][:k] == orders[k]
    pair_mod.run(PairConfig(run=str(run), seed=1, out=str(run / "seed1")))
    other = {r["prompt_id"]: r for r in read_stage(run / "seed1", "pair")}[p["many"]["prompt_id"]]
    assert other["rejected_idx"] != orders[16]

    # Resume: finished shards are not rewritten; a changed config is refused without --overwrite.
    out = run / "pairs16"
    before = json.loads((out / MANIFEST).read_text())
    pair_mod.run(PairConfig(run=str(run), max_negatives=16, out=str(out)))
    assert json.loads((out / MANIFEST).read_text())["shards"] == before["shards"]
    with pytest.raises(UsageError, match="another config"):
        pair_mod.run(PairConfig(run=str(run), max_negatives=4, out=str(out)))
    proc = negalign("pair", "--run", run, "--max-negatives", "4", "--out", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_pair_trl_export_loads_with_datasets(pair_run, tmp_path: Path) -> None:
    import datasets

    run, p = pair_run
    dest = tmp_path / "export" / "trl.parquet"
    proc = negalign("pair", "--run", run, "--max-negatives", "4", "--export-trl", dest, check=True)
    assert "pair:" in proc.stderr and "skipped" in proc.stderr and "TRL export: 4 pairs" in proc.stderr
    ds = datasets.load_dataset("parquet", data_files=str(dest), split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 4
    group = {r["prompt_id"]: r for r in read_stage(run / "pairs", "pair")}[p["many"]["prompt_id"]]
    for row, rejected in zip(ds, group["rejected"], strict=True):
        assert row["prompt"] == p["many"]["messages"]
        assert row["chosen"] == [{"role": "assistant", "content": "target A"}]
        assert row["rejected"] == [{"role": "assistant", "content": rejected}]


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory) -> Path:
    """prepare -> sample (HF, real default model) -> sample --greedy -> embed: 2 SFT prompts and one D2O prompt."""
    tmp = tmp_path_factory.mktemp("pipeline")
    rows = [json.loads(line) | {"negatives": None} for line in EXAMPLE_DATA.read_text().splitlines()[::24]]
    rows.append({"prompt": "Tell me how to insult my neighbour.", "target": None,
                 "negatives": ["You are an idiot.", "Go away."]})
    data = write_jsonl(tmp / "data.jsonl", rows)
    run = tmp / "run"
    negalign("prepare", "--run", run, "--input", data, "--negatives-field", "negatives", check=True)
    negalign("sample", "--run", run, "--engine", "hf", "-n", "4", "--max-tokens", "16", check=True)
    negalign("sample", "--run", run, "--engine", "hf", "--greedy", "--max-tokens", "4", check=True)
    proc = negalign("embed", "--run", run, check=True)
    assert "unique texts encoded" in proc.stderr and "texts/s" in proc.stderr
    return run


pipeline = pytest.mark.slow


@pipeline
def test_pipeline_embeddings(sampled_run: Path) -> None:
    stage = open_stage(sampled_run / "embeddings", "embed", verify=True)
    table = stage.read()
    samples = open_stage(sampled_run / "samples", "sample").read()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert np.allclose(np.linalg.norm(embeddings_array(table), axis=1), 1.0, atol=1e-5)
    sources = Counter(table["source"].to_pylist())
    assert sources == {"sample": 12, "greedy": 3, "target": 2, "negative": 2}
    assert samples.num_rows == 12
    assert stage.manifest["summary"]["unique_texts_encoded"] == len(set(table["text_sha"].to_pylist()))
    texts = {(r["prompt_id"], r["sample_idx"]): r["text"] for r in samples.to_pylist()}
    for r in table.drop(["embedding"]).to_pylist():
        if r["source"] == "sample":
            assert r["text_sha"] == text_sha(texts[(r["prompt_id"], r["sample_idx"])])


def _check_pairs(run: Path, export: Path) -> None:
    import datasets

    prompts = {r["prompt_id"]: r for r in read_stage(run / "prompts", "prompts")}
    samples = {(r["prompt_id"], r["sample_idx"]): r["text"] for r in read_stage(run / "samples", "sample")}
    greedy = {r["prompt_id"]: r["text"] for r in read_stage(run / "greedy", "sample")}
    kept = {(r["prompt_id"], r["sample_idx"]) for r in read_stage(run / "negatives", "filter") if r["kept"]}
    groups = read_stage(run / "pairs", "pair")
    assert groups
    n_pairs = 0
    for g in groups:
        pid = g["prompt_id"]
        assert g["chosen"] == prompts[pid]["target"] and g["y_ref"] == greedy[pid]
        assert g["messages"] == prompts[pid]["messages"]
        assert all((pid, i) in kept for i in g["rejected_idx"])
        assert g["rejected"] == [samples[(pid, i)] for i in g["rejected_idx"]]
        if g["chosen"] is None:  # the D2O prompt
            assert g["negatives"] == ["You are an idiot.", "Go away."] and g["anchors"]
            assert set(g["anchors"]) <= {samples[(pid, i)] for i in range(4)}
        else:
            assert g["anchors"] == [] and 1 <= len(g["rejected"]) <= 3
            n_pairs += len(g["rejected"])
    ds = datasets.load_dataset("parquet", data_files=str(export), split="train")
    assert len(ds) == n_pairs and ds.column_names == ["prompt", "chosen", "rejected"]
    assert all(r["chosen"][0]["role"] == "assistant" and r["prompt"][-1]["role"] == "user" for r in ds)


@pipeline
def test_pipeline_filter_then_pair(sampled_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(sampled_run, run)
    negalign("filter", "--run", run, check=True)
    negalign("pair", "--run", run, "--export-trl", tmp_path / "trl.parquet", check=True)
    # `sample --greedy` in the same run: pair reads greedy a shard at a time (the y_refs are checked below)
    assert pair_mod._same_layout(open_stage(run / "greedy", "sample"), open_stage(run / "samples", "sample"))
    _check_pairs(run, tmp_path / "trl.parquet")
    assert pq.read_table(tmp_path / "trl.parquet").num_rows > 0


# ------------------------------------------------------------------------------------------------ filter
def _vec(theta: float | None) -> list[float]:
    """A unit vector at angle theta (cosine to the target at 0 is cos(theta)); None = a corrupt (NaN) vector."""
    return [math.nan, math.nan] if theta is None else [math.cos(theta), math.sin(theta)]


@pytest.fixture
def filter_run(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Samples and 2-d embeddings built by hand, so that every similarity is a known cosine.

    Shard 0: prompt "a" (target at angle 0; N = 6) and prompt "d2o" (no target, two given negatives).
    Shard 1: prompt "c" (target). The embeddings rows are in another order than the samples rows, and carry a
    greedy row: `filter` must join on (prompt_id, sample_idx) and take only `source == "sample"` rows.
    """
    run = tmp_path / "run"
    pid = {k: prompt_id([{"role": "user", "content": k}]) for k in ("a", "d2o", "c")}
    # (sample_idx, text, finish_reason, angle)
    a = [(0, "a0", "stop", 1.0), (1, "a1", "length", 0.2), (2, "a0", "stop", 1.0), (3, " ", "stop", 0.0),
         (4, "a4", "stop", 1.5), (5, "a5", "stop", 0.5)]
    d = [(0, "b0", "stop", 2.0), (1, "b0", "stop", 2.0), (2, "b2", "stop", 2.05), (3, "b3", "stop", -1.0),
         (4, "b4", "length", 0.3)]
    c = [(0, "c0", "stop", 0.1), (1, "c1", "stop", 0.9), (2, "c2", "stop", 0.4)]
    groups = [[("a", a), ("d2o", d)], [("c", c)]]

    def smp(key, i, text, finish):
        return {"prompt_id": pid[key], "sample_idx": i, "text": text, "num_tokens": 3, "finish_reason": finish,
                "seed": i, "engine": "hf", "model": "m"}

    def emb(key, i, source, text, theta):
        return {"prompt_id": pid[key], "sample_idx": i, "source": source, "text_sha": text_sha(text),
                "is_empty": not text.strip(), "embedding": _vec(theta)}

    write_stage(run / "samples", "sample", [[smp(k, i, t, f) for k, rows in shard for i, t, f, _ in rows]
                                            for shard in groups], SAMPLE_SCHEMA, info={"num_samples": 6})
    shards = []
    for shard in groups:
        rows = [emb(k, i, "sample", t, th) for k, rows in shard for i, t, _, th in rows]
        rows = rows[::-1]                                           # not the samples' order
        for k, _ in shard:
            if k != "d2o":
                rows.append(emb(k, -1, "target", f"target {k}", 0.0))
            rows.append(emb(k, 0, "greedy", f"greedy {k}", 0.05))   # sample_idx 0 like a candidate: not one
        if shard[-1][0] == "d2o":
            rows += [emb("d2o", -2, "negative", "given 1", -1.02), emb("d2o", -3, "negative", "given 2", 3.0)]
        shards.append(rows)
    write_stage(run / "embeddings", "embed", shards, embed_mod.embed_schema(2))
    write_stage(run / "prompts", "prompts", [[prompt_row("a", "target a"), prompt_row("d2o", None, ["given 1",
                                                                                                   "given 2"]),
                                              prompt_row("c", "target c")]], PROMPTS_SCHEMA)
    return run, pid


def run_filter(run: Path, *args: str, out: str = "negatives") -> dict[tuple[str, int], dict]:
    negalign("filter", "--run", run, "--out", run / out, *args, check=True)
    return {(r["prompt_id"], r["sample_idx"]): r for r in read_stage(run / out, "filter")}


def outcome(rows: dict, pid: str, n: int) -> list[str | None]:
    return [rows[(pid, i)]["drop_reason"] for i in range(n)]


def test_filter_joins_samples_and_ranks_by_cosine(filter_run) -> None:
    run, pid = filter_run
    rows = run_filter(run)
    assert len(rows) == 6 + 5 + 3                                   # one row per candidate; no greedy/target rows
    # "a": N = 6 -> floor(4.5) = 4; unique non-empty: a0 (cos 1.0), a1 (0.2), a4 (1.5), a5 (0.5) -> m = min(4, 3)
    assert outcome(rows, pid["a"], 6) == [None, "near_target", "duplicate", "empty", None, None]
    assert [rows[(pid["a"], i)]["rank"] for i in range(6)] == [1, 3, -1, -1, 0, 2]
    for i, theta in ((0, 1.0), (1, 0.2), (4, 1.5), (5, 0.5)):
        assert rows[(pid["a"], i)]["sim_to_target"] == pytest.approx(math.cos(theta), abs=1e-6)
    # "c" (shard 1): N = 3 -> m = min(2, 2): the closest (c0) goes
    assert outcome(rows, pid["c"], 3) == ["near_target", None, None]
    stage = open_stage(run / "negatives", "filter")
    assert stage.manifest["summary"]["by_reason"] == {"kept": 9, "near_target": 2, "duplicate": 2, "empty": 1}
    assert stage.manifest["summary"]["prompts_with_negatives"] == 3
    # A resumed run reads the finished shards back for the summary: the same summary.
    (run / "negatives" / "part-00001.parquet").unlink()
    negalign("filter", "--run", run, check=True)
    assert open_stage(run / "negatives", "filter").manifest["summary"] == stage.manifest["summary"]


def test_filter_groups_without_target_are_deduplicated_only(filter_run) -> None:
    run, pid = filter_run
    rows = run_filter(run)
    # D2O prompt: no target, so no similarity (NaN) and no rank; only exact duplicates go.
    assert outcome(rows, pid["d2o"], 5) == [None, "duplicate", None, None, None]
    assert all(math.isnan(rows[(pid["d2o"], i)]["sim_to_target"]) for i in range(5))
    assert {rows[(pid["d2o"], i)]["rank"] for i in range(5)} == {-1}
    # NaN similarities stay out of the summary's quantiles (they would make every quantile NaN).
    summary = open_stage(run / "negatives", "filter").manifest["summary"]
    assert summary["sim_quantiles_all"]["q0"] == pytest.approx(math.cos(1.5), abs=1e-4)
    assert summary["sim_quantiles_all"]["q100"] == pytest.approx(1.0, abs=1e-4)      # the empty "a" sample


def test_filter_opt_in_drops(filter_run) -> None:
    run, pid = filter_run
    rows = run_filter(run, "--drop-truncated", out="truncated")
    # a1 and b4 hit the token limit (finish_reason "length", known only from the samples): dropped. "a" has
    # 3 unique left -> m = min(4, 2) keeps the two least similar: a4 and a0; a5 is now the closest.
    assert outcome(rows, pid["a"], 6) == [None, "truncated", "duplicate", "empty", None, "near_target"]
    assert outcome(rows, pid["d2o"], 5) == [None, "duplicate", None, None, "truncated"]

    # cos(2.05 - 2.0) = 0.9988: b2 is a near duplicate of b0; no other pair of a prompt is that close.
    rows = run_filter(run, "--near-dup-sim", "0.99", out="near_dup")
    assert outcome(rows, pid["d2o"], 5) == [None, "duplicate", "near_duplicate", None, None]
    assert outcome(rows, pid["a"], 6) == [None, "near_target", "duplicate", "empty", None, None]

    # b3 is at 0.02 rad from given negative 1 (cos 0.9998); no candidate is near given negative 2.
    rows = run_filter(run, "--max-neg-sim", "0.99", out="near_neg")
    assert outcome(rows, pid["d2o"], 5) == [None, "duplicate", None, "near_negative", None]
    assert outcome(rows, pid["c"], 3) == ["near_target", None, None]   # prompts without negatives: unchanged
    rows = run_filter(run, "--max-neg-sim", "0.99", "--near-dup-sim", "0.99", "--drop-truncated", out="all")
    assert outcome(rows, pid["d2o"], 5) == [None, "duplicate", "near_duplicate", "near_negative", "truncated"]


def test_filter_refuses_a_nan_embedding_in_one_line(filter_run) -> None:
    run, pid = filter_run
    emb = open_stage(run / "embeddings", "embed")
    shards = [t.to_pylist() for _, t in emb.iter_shards()]
    for r in shards[1]:
        if r["prompt_id"] == pid["c"] and r["sample_idx"] == 2 and r["source"] == "sample":
            r["embedding"] = _vec(None)
    shutil.rmtree(run / "embeddings")
    write_stage(run / "embeddings", "embed", shards, embed_mod.embed_schema(2))
    proc = negalign("filter", "--run", run)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    message = errors[0]
    assert "embedding" in message and pid["c"] in message and "Traceback" not in proc.stderr
    assert "sample_idx 2" in message and "part-00001" in message


def _prompts_with(run: Path, targets: dict[str, str | None], tasks: dict[str, str | None]) -> None:
    """Replace the fixture's prompts: the same prompts with other targets and task families."""
    rows = []
    for key in ("a", "d2o", "c"):
        row = prompt_row(key, targets.get(key), ["given 1", "given 2"] if key == "d2o" else None)
        rows.append({**row, "task": tasks.get(key)})
    shutil.rmtree(run / "prompts")
    write_stage(run / "prompts", "prompts", [rows], PROMPTS_SCHEMA)


OLD_FILTER_KEYS = {"strategy", "keep_fraction", "max_sim", "drop_truncated", "near_dup_sim", "max_neg_sim"}


def test_filter_drops_copies_of_the_target_after_the_rule(filter_run) -> None:
    run, pid = filter_run
    _prompts_with(run, {"a": "A0.", "c": "target c"}, {})
    rows = run_filter(run)
    # a0 (kept by the rule, rank 1) equals "A0." after the exact checker's normalisation; its duplicate (sample 2)
    # stays a duplicate. The rule itself is unchanged: same ranks, the same other rows.
    assert outcome(rows, pid["a"], 6) == ["same_as_target", "near_target", "duplicate", "empty", None, None]
    assert [rows[(pid["a"], i)]["rank"] for i in range(6)] == [1, 3, -1, -1, 0, 2]
    stage = open_stage(run / "negatives", "filter")
    assert stage.config["drop_same_as_target"] is True and "checker" not in stage.config
    assert stage.manifest["summary"]["by_reason"]["same_as_target"] == 1
    # "a": N = 6, floor(4.5) = 4 > n_unique - 1 = 3; "c": floor(2.25) = 2 = n_unique - 1 (the fraction sets m)
    assert stage.manifest["summary"]["prompts_m_by_unique"] == 1
    # Off: the rule before this drop, with the config (so the fingerprint) it had then.
    old = run_filter(run, "--no-drop-same-as-target", out="old")
    assert outcome(old, pid["a"], 6) == [None, "near_target", "duplicate", "empty", None, None]
    assert set(open_stage(run / "old", "filter").config) == OLD_FILTER_KEYS
    # An output made under the old rule is not resumed under the new one (no mixed rows).
    proc = negalign("filter", "--run", run, "--out", run / "old")
    assert proc.returncode == 2 and "drop_same_as_target" in proc.stderr, proc.stderr


def test_filter_drops_checker_correct_candidates_before_the_rule(filter_run, tmp_path: Path) -> None:
    run, pid = filter_run
    _prompts_with(run, {"a": "a0", "c": "c1"}, {"a": "fam_a", "c": "fam_c", "d2o": "fam_d"})
    cfg = tmp_path / "filter.yaml"
    cfg.write_text("checkers: {fam_a: exact, fam_c: contains, fam_x: number}\n")
    proc = negalign("filter", "--run", run, "--out", run / "checked", "-c", cfg, check=True)
    rows = {(r["prompt_id"], r["sample_idx"]): r for r in read_stage(run / "checked", "filter")}
    # "a": a0 (both copies) is right, so it leaves before dedup and ranking: 3 unique left, m = min(4, 2) keeps
    # a4 and a5, and a1 (the closest) goes. "c": c1 is right; c0, c2 left, m = min(2, 1) keeps c2.
    assert outcome(rows, pid["a"], 6) == ["correct", "near_target", "correct", "empty", None, None]
    assert outcome(rows, pid["c"], 3) == ["near_target", "correct", None]
    assert outcome(rows, pid["d2o"], 5) == [None, "duplicate", None, None, None]     # no target: no checker
    summary = open_stage(run / "checked", "filter").manifest["summary"]
    assert summary["correct_by_family"] == {"fam_a": 2, "fam_c": 1}
    assert summary["prompts_m_by_unique"] == 2
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "fam_x" in warnings[0], proc.stderr
    assert "fam_a 2, fam_c 1" in proc.stderr.replace("\n", " ")
    # inspect shows the per-family counts (from the manifest: the output has no task column)
    shown = negalign("inspect", run / "checked", check=True)
    assert "fam_a 2" in shown.stdout + shown.stderr
    # kind none = similarity alone (the copy rule still applies: a0 is a copy of the target "a0")
    rows = run_filter(run, "--checker", "none", out="none")
    assert outcome(rows, pid["a"], 6) == ["same_as_target", "near_target", "duplicate", "empty", None, None]
    # one kind for all prompts, no task needed
    rows = run_filter(run, "--checker", "exact", out="all_exact")
    assert outcome(rows, pid["c"], 3) == ["near_target", "correct", None]


def test_filter_checker_bad_input_is_one_line_exit_2(filter_run, tmp_path: Path) -> None:
    run, _ = filter_run
    for yaml_text, words in (("checkers: {fam_a: exactly}\n", ("exactly", "fam_a")),
                             ("checker: numbr\n", ("numbr", "checker"))):
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml_text)
        proc = negalign("filter", "--run", run, "--out", run / "bad", "-c", cfg)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(errors) == 1 and all(w in errors[0] for w in words), proc.stderr
        assert not (run / "bad").exists()
    # the fixture's prompts have no task: `checkers` cannot apply
    cfg.write_text("checkers: {fam_a: exact}\n")
    proc = negalign("filter", "--run", run, "--out", run / "bad", "-c", cfg)
    assert proc.returncode == 2 and "task" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (run / "bad").exists()


def test_pair_groups_from_the_real_filter(filter_run) -> None:
    run, pid = filter_run
    negalign("filter", "--run", run, check=True)
    negalign("pair", "--run", run, "--max-negatives", "2", check=True)
    groups = {g["prompt_id"]: g for g in read_stage(run / "pairs", "pair")}
    assert set(groups) == set(pid.values())
    a, c, d = groups[pid["a"]], groups[pid["c"]], groups[pid["d2o"]]
    assert a["chosen"] == "target a" and sorted(a["rejected_idx"]) in ([0, 4], [0, 5], [4, 5])
    assert a["rejected"] == [{0: "a0", 4: "a4", 5: "a5"}[i] for i in a["rejected_idx"]]
    assert sorted(c["rejected_idx"]) == [1, 2] and c["rejected"] == [f"c{i}" for i in c["rejected_idx"]]
    assert d["chosen"] is None and d["negatives"] == ["given 1", "given 2"]
    assert sorted(d["anchors"]) == ["b0", "b2", "b3", "b4"]          # kept self-samples, no duplicate
    # the summary says how many groups each `train --num-negatives K` can use (groups with a target and >= K)
    summary = json.loads((run / "pairs" / "_manifest.json").read_text())["summary"]
    with_target = [g for g in groups.values() if g["chosen"] is not None]
    for k, n in summary["groups_with_k"].items():
        assert n == sum(len(g["rejected"]) >= int(k) for g in with_target)
    assert summary["groups_with_k"]["2"] == 2 and summary["groups_with_k"]["4"] == 0


def test_filter_summary_quantiles_match_numpy_within_a_bin() -> None:
    """The summary folds a fixed-size histogram per shard (flat memory at any run size), not every similarity."""
    from negalign.filter import SIM_BIN, _add, _quantiles, _sim_histogram

    rng = np.random.default_rng(0)
    parts = [np.clip(rng.normal(0.6, 0.2, n), -1, 1) for n in (1, 7, 1000, 333)]
    parts[2][:5] = np.nan                                              # D2O prompts: no similarity
    total = None
    for p in parts:
        h = _sim_histogram(p)
        total = h if total is None else _add({**_blank(), "hist_all": total, "hist_kept": total},
                                             {**_blank(), "hist_all": h, "hist_kept": h})["hist_all"]
    values = np.concatenate(parts)
    values = values[np.isfinite(values)]
    got = _quantiles(total)
    want = dict(zip(("q0", "q25", "q50", "q75", "q100"), np.quantile(values, [0, 0.25, 0.5, 0.75, 1]), strict=True))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=SIM_BIN)
    assert _quantiles(_sim_histogram(np.array([np.nan]))) == {}


def _blank() -> dict:
    return {"candidates": 0, "prompts": 0, "prompts_with_negatives": 0, "by_reason": Counter(),
            "correct_by_family": Counter(), "capped_by_unique": 0}
