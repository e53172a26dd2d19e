"""`eval`: answer held-out prompts with a model and score the answers, with bootstrap intervals (issue 11).

Layout of `RUN/eval/NAME/`:

- `generations/`: the answers, written by the `sample` stage itself (same engines, same shards, same resume);
  greedy by default, or `--num-samples N` at `--temperature T`.
- `scores/`: one row per answer (stage "eval"): prompt_id, sample_idx, task, text, target, num_tokens,
  finish_reason, checker_kind, correct, embed_sim, reward, reward_target, win. Shard i scores generations shard i.
- `pref_acc/`: with `--pairs DIR`, one row per held-out group: the implicit rewards of chosen and rejected.
- `summary.json`: every metric overall and per task family with a bootstrap 95 % interval over prompts, plus the
  model's training config (read from its folder's `_manifest.json`), so `report` needs only eval folders.

Resume: each scores shard records the sha256 of the generations shard it scored and a fingerprint per metric
(checker kinds, embedder, reward model). A rerun rescores only the shards whose answers changed and only the
metrics whose setting changed; a metric not asked for this time keeps the values it has.

Metrics (per prompt first, averaged over its samples; then the mean over prompts and its interval):
- `correct`: the checker (`negalign.checkers`) against the target; kind from `checkers: {family: kind}`, else
  `--checker` (default exact).
- `embed_sim`: cosine of answer and target under the embedder (the run's, from RUN/embeddings, else minilm).
- `reward`, `win`: with `--reward-model PATH`, the sequence-classification score of answer and target; win = 1 if
  the answer scores higher than the target, 0.5 on a tie, 0 below (Self-Contrast's protocol); `reward_sigmoid` =
  mean σ(reward).
- length: mean tokens, truncation rate (hit --max-tokens), distinct-1/2 (unique / all word n-grams of a prompt's
  answers, averaged over prompts).
- `pref_acc`: share of (chosen, rejected) pairs of held-out groups where r(chosen) > r(rejected), with
  r(y) = logp(model, x, y) − logp(ref, x, y) (summed response log-probs, EOS included).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from negalign import checkers, stats
from negalign.config import EvalConfig, SampleConfig, run_path
from negalign.console import console
from negalign.errors import NegalignError, UsageError
from negalign.models import best_device, model_fingerprint, model_label, render_prompt_ids, resolve_model
from negalign.reward import RewardModel
from negalign.schemas import PREF_SCHEMA, SCORES_SCHEMA
from negalign.stages import output_dir, stage_input
from negalign.store import (
    StageOutput,
    atomic_write_json,
    fingerprint,
    open_stage,
    read_manifest,
)

DEFAULT_MODEL = "smollm2-135m"

METRIC_COLUMNS = {"checker": ("checker_kind", "correct"), "embed_sim": ("embed_sim",),
                  "reward": ("reward", "reward_target", "win")}
NO_TASK = "(none)"


# ----------------------------------------------------------------------------------------------- the model

def read_model_manifest(folder: Path) -> dict[str, Any]:
    """The training config that `train` recorded in MODEL/_manifest.json (store.read_manifest, the one reader);
    {} when the folder has no manifest or a broken one (the model is then evaluated as a base model)."""
    try:
        manifest = read_manifest(folder)
    except UsageError:
        return {}
    config = (manifest or {}).get("config")
    return dict(config) if isinstance(config, dict) else {}


def locate_model(cfg: EvalConfig) -> tuple[str, str, dict[str, Any]]:
    """(what to load, eval name, training config): a name in RUN/models/, a folder, or an alias like smollm2-135m."""
    in_run = run_path(cfg, "models", cfg.model)
    path = str(in_run) if "/" not in cfg.model and in_run.is_dir() else cfg.model
    resolved = resolve_model(path)  # refuses a missing folder with a clear message
    folder = Path(resolved)
    train_config = read_model_manifest(folder) if folder.is_dir() else {}
    if not train_config:
        train_config = {"objective": "base", "model": model_label(path)}
    name = cfg.name or model_label(path)
    return path, name, train_config


def reference_model(cfg: EvalConfig, train_config: dict[str, Any]) -> str:
    """pref-acc's reference: --ref-model, else the starting model recorded by `train` (base_model), else the default."""
    return cfg.ref_model or train_config.get("base_model") or train_config.get("model") or DEFAULT_MODEL


# ----------------------------------------------------------------------------------------------- metric pieces

def checker_kind(task: str | None, cfg: EvalConfig) -> str:
    return cfg.checkers.get(task or "", cfg.checker) if cfg.checkers else cfg.checker


def _check_kinds(cfg: EvalConfig) -> None:
    for family, kind in {"--checker": cfg.checker, **cfg.checkers}.items():
        if kind not in (*checkers.KINDS, checkers.NONE):
            raise UsageError(f"checker for {family!r}: unknown kind {kind!r} (choose from "
                             f"{', '.join((*checkers.KINDS, checkers.NONE))})")


def distinct_n(texts: list[str], n: int) -> float | None:
    """distinct-n of a set of answers: unique word n-grams / all word n-grams (Li et al., 2016); None without any."""
    grams = []
    for text in texts:
        toks = text.lower().split()
        grams += [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _distinct_per_prompt(texts: list[str], prompt_of: list[int], num_prompts: int, n: int) -> np.ndarray:
    """distinct-n of each prompt's answers pooled (one answer when greedy: repetition inside it), NaN if none.

    Per prompt rather than corpus-level so that it is a mean over prompts like every other metric and gets an
    honest bootstrap interval (resampling prompts with replacement biases a corpus-level ratio downwards).
    """
    groups: list[list[str]] = [[] for _ in range(num_prompts)]
    for text, p in zip(texts, prompt_of, strict=True):
        groups[p].append(text)
    values = [distinct_n(g, n) for g in groups]
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _embed_sims(texts: list[str], targets: list[str | None], embedder: Any) -> list[float | None]:
    """Cosine of each text to its target (both L2-normalised); each unique string is encoded once."""
    unique = list(dict.fromkeys([*texts, *[t for t in targets if t is not None]]))
    if not unique:
        return []
    vecs = np.asarray(embedder.encode(unique, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False), dtype=np.float32)
    row = {t: i for i, t in enumerate(unique)}
    return [None if tg is None else float(np.clip(vecs[row[tx]] @ vecs[row[tg]], -1.0, 1.0))
            for tx, tg in zip(texts, targets, strict=True)]


# ----------------------------------------------------------------------------------------------- scoring

def _metric_plan(cfg: EvalConfig, embedder_name: str | None) -> dict[str, str | None]:
    """Fingerprint of each requested metric's setting; None = not requested this time."""
    plan: dict[str, str | None] = {
        "checker": fingerprint({"default": cfg.checker, "map": cfg.checkers}),
        "embed_sim": fingerprint({"embedder": model_label(embedder_name),
                                  "weights": model_fingerprint(embedder_name)}) if embedder_name else None,
        "reward": None,
    }
    if cfg.reward_model:
        plan["reward"] = fingerprint({"reward_model": model_fingerprint(cfg.reward_model), "tie": cfg.reward_tie})
    return plan


def _default_embedder(cfg: EvalConfig) -> str | None:
    if not cfg.embed_sim:
        return None
    if cfg.embedder:
        return cfg.embedder
    m = read_manifest(run_path(cfg, "embeddings"))
    name = (m or {}).get("info", {}).get("embedder")
    return name or "minilm"


def _score_shard(gen: pa.Table, old: pa.Table | None, todo: set[str], prompts: dict[str, dict[str, Any]],
                 cfg: EvalConfig, tools: dict[str, Any]) -> pa.Table:
    rows = gen.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")]).to_pylist()
    texts = [r["text"] or "" for r in rows]
    targets = [prompts.get(r["prompt_id"], {}).get("target") for r in rows]
    tasks = [prompts.get(r["prompt_id"], {}).get("task") for r in rows]
    cols: dict[str, list[Any]] = {
        "prompt_id": [r["prompt_id"] for r in rows], "sample_idx": [r["sample_idx"] for r in rows],
        "task": tasks, "text": texts, "target": targets, "num_tokens": [r["num_tokens"] for r in rows],
        "finish_reason": [r["finish_reason"] for r in rows],
    }
    keep = old is not None and old.num_rows == len(rows)
    for metric, names in METRIC_COLUMNS.items():
        if metric not in todo:
            for c in names:
                cols[c] = old.column(c).to_pylist() if keep else [None] * len(rows)
    if "checker" in todo:
        kinds = [checker_kind(t, cfg) for t in tasks]
        cols["checker_kind"] = kinds
        cols["correct"] = [checkers.check(k, x, tg) for k, x, tg in zip(kinds, texts, targets, strict=True)]
    if "embed_sim" in todo:
        cols["embed_sim"] = _embed_sims(texts, targets, tools["embedder"]())
    if "reward" in todo:
        rm: RewardModel = tools["reward"]()
        msgs = [prompts[r["prompt_id"]]["messages"] for r in rows]
        rewards = rm.score(msgs, texts)
        have = [i for i, t in enumerate(targets) if t is not None]
        first = {}
        for i in have:
            first.setdefault(cols["prompt_id"][i], i)
        target_scores = dict(zip(first, rm.score([msgs[i] for i in first.values()],
                                                 [targets[i] for i in first.values()]), strict=True))
        ref = [target_scores.get(p) if t is not None else None for p, t in zip(cols["prompt_id"], targets,
                                                                                strict=True)]
        wins = []
        for x, tg, r, rt in zip(texts, targets, rewards, ref, strict=True):
            if rt is None:
                wins.append(None)
            elif x.strip() == tg.strip():
                wins.append(0.5)  # the same answer: a tie, whatever the float noise of batching
            else:
                wins.append(float(stats.win_scores([r], [rt], cfg.reward_tie)[0]))
        cols["reward"], cols["reward_target"], cols["win"] = rewards, ref, wins
    return pa.table({name: pa.array(cols[name], type=SCORES_SCHEMA.field(name).type) for name in SCORES_SCHEMA.names},
                    schema=SCORES_SCHEMA)


# ----------------------------------------------------------------------------------------------- pref-acc

def _response_logps(model: Any, tokenizer: Any, messages: list[dict[str, str]], responses: list[str]) -> list[float]:
    """Summed log-probs of each response given the prompt (prompt masked, EOS of the response included): the padded
    layout of packing.sequence_logps, the function training and the reference cache use."""
    import torch

    from negalign.packing import pad, sequence_logps, to_device

    prompt = render_prompt_ids(tokenizer, messages)
    eos = tokenizer.eos_token_id
    seqs = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            for r in responses]
    batch = pad([(prompt, seqs)], tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    with torch.no_grad():
        logps, _ = sequence_logps(model, to_device(batch, model))
    return [float(x) for x in logps.tolist()]


def _pref_acc(cfg: EvalConfig, model_path: str, train_config: dict[str, Any], out_dir: Path,
              model_fp: str, task_of: dict[str, str | None]) -> Path | None:
    """Implicit-reward ranking accuracy on held-out groups; one row per group into out_dir/pref_acc."""
    if not cfg.pairs:
        return None
    from negalign.models import load_causal_lm, load_tokenizer

    pairs = open_stage(*stage_input(cfg, "pairs"))
    ref = reference_model(cfg, train_config)
    if train_config.get("objective") == "base" and not cfg.ref_model:
        console.print("eval: pref-acc of a base model against itself is 0.5 by construction; pass --ref-model")
    conf = {"model_fingerprint": model_fp, "ref_fingerprint": model_fingerprint(ref)}
    out = StageOutput.open(out_dir / "pref_acc", "eval-pref", conf, {"pairs": pairs.fingerprint},
                           overwrite=cfg.overwrite, info={"ref_model": model_label(ref)})
    num_shards = pairs.manifest["num_shards"]
    plan = [s for s in range(num_shards) if not out.done(s)]
    if plan:
        device = best_device()
        tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
        policy = load_causal_lm(model_path, device=device, trust_remote_code=cfg.trust_remote_code).eval()
        reference = load_causal_lm(ref, device=device, trust_remote_code=cfg.trust_remote_code).eval()
        files = pairs.shard_files()
        for s in plan:
            table = pairs.read_shard(files[s].name).to_pylist()
            rows = []
            for g in table:
                rejected = [r for r in (g.get("rejected") or []) if r is not None]
                if g.get("chosen") is None or not rejected:
                    continue
                texts = [g["chosen"], *rejected]
                pol = _response_logps(policy, tok, g["messages"], texts)
                rf = _response_logps(reference, tok, g["messages"], texts)
                r = [a - b for a, b in zip(pol, rf, strict=True)]
                acc = float(np.mean([r[0] > x for x in r[1:]]))
                rows.append({"prompt_id": g["prompt_id"], "task": g.get("task") or task_of.get(g["prompt_id"]),
                             "reward_chosen": r[0],
                             "reward_rejected": r[1:], "accuracy": acc})
            out.write_shard(s, pa.Table.from_pylist(rows, schema=PREF_SCHEMA))
    out.finish(num_shards)
    return out.path


# ----------------------------------------------------------------------------------------------- summary

def _per_prompt(values: list[Any], prompt_of: list[int], n: int) -> np.ndarray:
    """Average a per-answer column over each prompt's samples (NaN where a prompt has no value)."""
    sums, counts = np.zeros(n), np.zeros(n)
    for v, p in zip(values, prompt_of, strict=True):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        sums[p] += float(v)
        counts[p] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def summarise(table: pa.Table, cfg: EvalConfig, pref: pa.Table | None = None) -> dict[str, Any]:
    """Every metric with its bootstrap interval, overall and per task family."""
    def block(t: pa.Table, p: pa.Table | None) -> dict[str, Any]:
        pids = t.column("prompt_id").to_pylist()
        index: dict[str, int] = {}
        prompt_of = [index.setdefault(x, len(index)) for x in pids]
        n = len(index)
        col = {c: t.column(c).to_pylist() for c in t.column_names}
        ci = {"n_boot": cfg.bootstrap, "seed": cfg.seed}
        trunc = [r == "length" for r in col["finish_reason"]]
        reward = col["reward"]
        sig = [None if r is None else 1.0 / (1.0 + math.exp(-r)) for r in reward]
        out = {
            "num_prompts": n, "num_answers": t.num_rows,
            "accuracy": stats.bootstrap_ci(_per_prompt(col["correct"], prompt_of, n), **ci),
            "embed_sim": stats.bootstrap_ci(_per_prompt(col["embed_sim"], prompt_of, n), **ci),
            "win_rate": stats.bootstrap_ci(_per_prompt(col["win"], prompt_of, n), **ci),
            "reward_sigmoid": stats.bootstrap_ci(_per_prompt(sig, prompt_of, n), **ci),
            "tokens": stats.bootstrap_ci(_per_prompt(col["num_tokens"], prompt_of, n), **ci),
            "truncated": stats.bootstrap_ci(_per_prompt(trunc, prompt_of, n), **ci),
            "distinct_1": stats.bootstrap_ci(_distinct_per_prompt(col["text"], prompt_of, n, 1), **ci),
            "distinct_2": stats.bootstrap_ci(_distinct_per_prompt(col["text"], prompt_of, n, 2), **ci),
            "empty": stats.bootstrap_ci(_per_prompt([not x.strip() for x in col["text"]], prompt_of, n), **ci),
        }
        if p is not None:
            out["pref_acc"] = stats.bootstrap_ci(p.column("accuracy").to_numpy(zero_copy_only=False), **ci)
        return out

    summary = {"overall": block(table, pref), "by_task": {}}
    tasks = table.column("task").to_pylist()
    families = sorted({t for t in tasks if t is not None})
    if families:
        import pyarrow.compute as pc

        for fam in [*families, *([NO_TASK] if None in tasks else [])]:
            mask = pc.is_null(table.column("task")) if fam == NO_TASK else pc.equal(table.column("task"), fam)
            pm = None
            if pref is not None:
                pmask = (pc.is_null(pref.column("task")) if fam == NO_TASK
                         else pc.fill_null(pc.equal(pref.column("task"), fam), False))
                pm = pref.filter(pmask) if pref.num_rows else None
            summary["by_task"][fam] = block(table.filter(mask), pm if pm is not None and pm.num_rows else None)
    return summary


# ----------------------------------------------------------------------------------------------- run

def _sample_config(cfg: EvalConfig, model_path: str, prompts: Path, out: Path) -> SampleConfig:
    greedy = cfg.num_samples == 1 and cfg.temperature is None
    values = {"run": cfg.run, "seed": cfg.seed, "overwrite": cfg.overwrite, "debug": cfg.debug,
              "verbose": cfg.verbose, "threads": cfg.threads, "model": model_path,
              "num_samples": cfg.num_samples, "temperature": cfg.temperature or 1.0, "top_p": cfg.top_p,
              "max_tokens": cfg.max_tokens, "max_prompt_tokens": cfg.max_prompt_tokens, "greedy": greedy,
              "engine": cfg.engine, "shard_size": cfg.shard_size, "batch_size": cfg.batch_size,
              "prompts": str(prompts), "out": str(out), "trust_remote_code": cfg.trust_remote_code,
              "cpu_kv_cache_gb": cfg.cpu_kv_cache_gb, "gpu_memory_utilization": cfg.gpu_memory_utilization}
    names = {f.name for f in dataclasses.fields(SampleConfig)}
    return SampleConfig(**{k: v for k, v in values.items() if k in names})


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Generate (via `sample`), score, summarise; returns the summary that is also written to summary.json."""
    from negalign import sample

    _check_kinds(cfg)
    model_path, name, train_config = locate_model(cfg)
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--name must be a plain folder name, got {name!r}")
    prompts_dir, kind = stage_input(cfg, "prompts")
    if read_manifest(prompts_dir) is None:
        raise UsageError(f"{prompts_dir}: no held-out prompts; run `prepare --test-fraction F` or pass --prompts DIR")
    prompts_in = open_stage(prompts_dir, kind)
    out_dir = output_dir(dataclasses.replace(cfg, name=name))
    scores_dir, gen_dir = out_dir / "scores", out_dir / "generations"
    model_fp = model_fingerprint(model_path)

    # The scores folder remembers which weights it scored: other weights under the same name are refused (or,
    # with --overwrite, everything is redone, generations included: `sample` only sees the folder name).
    old = read_manifest(scores_dir)
    if old is not None and old.get("config", {}).get("model_fingerprint") != model_fp:
        if not cfg.overwrite:
            raise UsageError(f"{out_dir}: was evaluated with other weights for '{name}'; pass --overwrite to redo it, "
                             "or --name to keep both")
        shutil.rmtree(gen_dir, ignore_errors=True)
    scores = StageOutput.open(scores_dir, "eval", {"model_fingerprint": model_fp, "model": model_label(model_path)},
                              {}, overwrite=cfg.overwrite)

    t0 = time.time()
    sample.run(_sample_config(cfg, model_path, prompts_dir, gen_dir))
    gen_s = time.time() - t0
    gens = open_stage(gen_dir, "sample")

    embedder_name = _default_embedder(cfg)
    plan = _metric_plan(cfg, embedder_name)
    loaded: dict[str, Any] = {}

    def embedder():
        if "embedder" not in loaded:
            from negalign.models import load_embedder

            loaded["embedder"] = load_embedder(embedder_name, trust_remote_code=cfg.trust_remote_code)
        return loaded["embedder"]

    def reward():
        if "reward" not in loaded:
            loaded["reward"] = RewardModel(cfg.reward_model, batch_size=cfg.reward_batch_size,
                                           trust_remote_code=cfg.trust_remote_code)
        return loaded["reward"]

    tools = {"embedder": embedder, "reward": reward}
    prompt_cols = ["prompt_id", "messages", "target"] + (["task"] if _has_task(prompts_in) else [])
    prompts = {r["prompt_id"]: r for r in prompts_in.read(prompt_cols).to_pylist()}
    num_shards = gens.manifest["num_shards"]
    rescored: dict[str, int] = {"shards": 0}
    t1 = time.time()
    for s, f in enumerate(gens.shard_files()):
        gen_sha = gens.manifest["shards"][f.name]["sha256"]
        entry = scores.shard_entry(s)
        same = entry is not None and entry["meta"].get("generations_sha") == gen_sha
        had = entry["meta"].get("metrics", {}) if same else {}
        want = {m: (fp if fp is not None else had.get(m)) for m, fp in plan.items()}
        todo = {m for m, fp in want.items() if fp is not None and had.get(m) != fp}
        if same and not todo:
            continue
        table = _score_shard(gens.read_shard(f.name), scores.read_shard(s) if same else None, todo, prompts, cfg, tools)
        scores.write_shard(s, table, {"generations_sha": gen_sha, "metrics": {m: v for m, v in want.items() if v}})
        rescored["shards"] += 1
        for m in todo:
            rescored[m] = rescored.get(m, 0) + 1
    score_s = time.time() - t1
    if not scores.finish(num_shards, timings={"generate_s": round(gen_s, 2), "score_s": round(score_s, 2)}):
        raise NegalignError(f"{scores_dir}: scoring did not complete; re-run to resume")

    task_of = {pid: p.get("task") for pid, p in prompts.items()}  # groups made from these prompts get their family
    pref_dir = _pref_acc(cfg, model_path, train_config, out_dir, model_fp, task_of)
    scored = open_stage(scores_dir, "eval")
    pref = open_stage(pref_dir, "eval-pref").read() if pref_dir else None
    metric_meta = next(iter(scored.manifest["shards"].values()), {}).get("meta", {}).get("metrics", {})
    summary = {
        "name": name, "model": model_label(model_path), "model_path": str(resolve_model(model_path)),
        "model_fingerprint": model_fp, "train_config": train_config,
        "prompts": str(prompts_dir), "generation": {k: gens.config.get(k) for k in
                                                    ("greedy", "temperature", "top_p", "max_tokens", "seed")},
        "num_samples": gens.manifest.get("info", {}).get("num_samples"),
        "engine": ", ".join(sorted(set(gens.read(["engine"]).column("engine").to_pylist()))) or None,
        "checker": {"default": cfg.checker, "by_task": cfg.checkers},
        "embedder": model_label(embedder_name) if metric_meta.get("embed_sim") else None,
        "reward_model": model_label(cfg.reward_model) if cfg.reward_model else (
            "(kept from an earlier run)" if metric_meta.get("reward") else None),
        "ref_model": reference_model(cfg, train_config) if pref is not None else None,
        "bootstrap": {"n_boot": cfg.bootstrap, "seed": cfg.seed, "level": stats.LEVEL, "unit": "prompt"},
        **summarise(scored.read(), cfg, pref),
        "scores_fingerprint": scored.fingerprint,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    _print_summary(summary, rescored, out_dir)
    return summary


def _has_task(stage) -> bool:
    import pyarrow.parquet as pq

    files = stage.shard_files()
    return bool(files) and "task" in pq.read_schema(files[0]).names


def fmt_ci(m: dict[str, Any] | None, pct: bool = False, digits: int = 3) -> str:
    """"0.420 [0.300, 0.550]", or "42.0% [30.0, 55.0]" with pct; "–" when the metric was not computed."""
    return stats.fmt_interval(m, scale=100.0, digits=1, unit="%") if pct else stats.fmt_interval(m, digits=digits)


def _print_summary(summary: dict[str, Any], rescored: dict[str, int], out_dir: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    o = summary["overall"]
    table = Table(title=escape(f"eval {summary['name']} ({o['num_prompts']} prompts, 95% bootstrap intervals)"),
                  title_justify="left")
    for c in ("metric", "overall", *summary["by_task"]):
        table.add_column(escape(c))
    rows = [("accuracy", "accuracy", True), ("embed-sim", "embed_sim", False), ("win rate", "win_rate", True),
            ("σ(reward)", "reward_sigmoid", False), ("pref-acc", "pref_acc", True), ("tokens", "tokens", False),
            ("truncated", "truncated", True), ("distinct-1", "distinct_1", False), ("distinct-2", "distinct_2", False)]
    for label, key, pct in rows:
        if not o.get(key) or o[key].get("mean") is None:
            continue
        digits = 1 if key == "tokens" else 3
        table.add_row(label, fmt_ci(o[key], pct, digits),
                      *[fmt_ci(b.get(key), pct, digits) for b in summary["by_task"].values()])
    console.print(table)
    what = ", ".join(f"{k} {v}" for k, v in rescored.items() if k != "shards") or "nothing new"
    console.print(f"eval: {rescored['shards']} shard(s) scored ({what}); summary -> {out_dir / 'summary.json'}")

