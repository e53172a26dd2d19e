"""Benchmark of the ``embed`` stage: `negalign embed` vs a plain sentence-transformers encode, on real samples.

    .venv/bin/python benchmarks/bench_embed.py [--run DIR] [--out benchmarks/out/embed]
        [--results benchmarks/RESULTS_embed.md] [--profile auto|always|never]

Without ``--run`` it builds one under OUT/run from ``examples/data/short_answers.jsonl``: ``negalign prepare``
then ``negalign sample --engine hf -n 16 --max-tokens 32`` (both skipped when their output is already complete;
an unfinished sample stage resumes by itself). Then, in one run, one subprocess after another, on the same texts
(every slot `negalign embed` embeds: all candidates + targets, and given negatives / greedy answers if the run
has any), with the same embedder (``minilm`` unless ``--embedder``):

- (a) ``python -m negalign embed --run RUN --batch-size 128`` into a fresh folder (RUN/embeddings for a run this
  script built; OUT/embeddings via ``--out`` for a run given with ``--run``, so that its own embeddings stay
  untouched). Rows, unique texts encoded, dedup share and ``timings.encode_s`` come from its _manifest.json
  (encode_s starts after the model load: it covers re-reading the shard, hashing, encoding and writing it).
- (b) a plain ``SentenceTransformer(str(path)).encode(all_texts, batch_size=128, normalize_embeddings=True)``
  on every text, no dedup; only the encode call is timed (wall = the whole subprocess, model load included).
- (c) the same plain encode on the unique texts only (the best dedup can buy).

Sides run in ``--repeat`` rounds (a, b, c in turn, fresh processes each time); each side is reported at its best
round (the least disturbed by other jobs on a shared machine), with the median and worst encode time beside it.
texts/s = input rows (every slot) per second of encode time; for (c) also per unique text. Peak RSS = ``ru_maxrss``
of each subprocess from ``wait4`` (each side is one process). The vectors are checked: negalign's stored embedding
vs (b)'s vector of the same slot, cosine over every row (min reported) and over a handful of spread rows.
If (a) encodes fewer unique texts per second than (b) (below ``--slow-ratio``), or with ``--profile always``,
negalign embed is run once more under cProfile (into OUT/embeddings-profile; not timed) and the result lists where
the time goes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "examples" / "data" / "short_answers.jsonl"
BATCH = 128


# ----------------------------------------------------------------------------------------------- worker (b), (c)

def worker_plain(args: argparse.Namespace) -> None:
    """Plain sentence-transformers: load the model, one `encode` over the given texts; only the encode is timed."""
    t_start = time.perf_counter()
    import numpy as np
    from sentence_transformers import SentenceTransformer

    texts = json.loads(Path(args.texts).read_text())
    model = SentenceTransformer(str(args.model_path))
    e0 = time.perf_counter()
    vecs = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
    encode_s = time.perf_counter() - e0
    np.save(args.vectors, np.asarray(vecs, dtype=np.float32))
    Path(args.result).write_text(json.dumps({"rows": len(texts), "encode_s": encode_s, "load_s": e0 - t_start,
                                             "dim": int(vecs.shape[1]), "device": str(model.device)}))


# ----------------------------------------------------------------------------------------------- the parent

def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_timed(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run `cmd` (cwd = repo root), output to `log`; wall time and peak RSS (ru_maxrss from wait4)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def negalign(*argv: str) -> list[str]:
    return [sys.executable, "-m", "negalign", *argv]


def build_run(run: Path, out: Path) -> str:
    """prepare + sample (hf, n=16, 32 tokens) unless already complete; the sample stage resumes by itself.
    Returns a note on what was done."""
    from negalign.store import read_manifest

    def complete(path: Path) -> bool:
        m = read_manifest(path)
        return m is not None and m.get("status") == "complete"

    if not complete(run / "prompts"):
        print(f"negalign prepare --run {run} ...", flush=True)
        run_timed(negalign("prepare", "--run", str(run), "--input", str(DATA)), out / "prepare.log")
    if not complete(run / "samples"):
        print(f"negalign sample --run {run} --engine hf -n 16 --max-tokens 32 (a few minutes on CPU) ...",
              flush=True)
        r = run_timed(negalign("sample", "--run", str(run), "--engine", "hf", "-n", "16", "--max-tokens", "32"),
                      out / "sample.log")
        print(f"  sample took {r['wall_s']:.0f} s", flush=True)
        return (f"samples generated in this invocation: `negalign sample --engine hf` took {r['wall_s']:.0f} s "
                "wall (not part of any row)")
    print(f"reusing the complete samples in {run / 'samples'}", flush=True)
    m = read_manifest(run / "samples") or {}
    return (f"samples reused from an earlier invocation (their `generate_s` was "
            f"{m.get('timings', {}).get('generate_s', '?')} s)")


def collect_slots(run: Path) -> list[tuple[str, int, str, str]]:
    """(prompt_id, sample_idx, source, text) of every slot `embed` fills, read here independently of embed.py:
    per prompt its target (-1), given negatives (-2-j), samples, greedy answers (if RUN/greedy is complete)."""
    from negalign.store import open_stage, read_manifest

    prompts = {r["prompt_id"]: r for r in open_stage(run / "prompts", "prompts")
               .read(["prompt_id", "target", "negatives"]).to_pylist()}
    samples = open_stage(run / "samples", "sample").read(["prompt_id", "sample_idx", "text"]).to_pylist()
    greedy: list[dict[str, Any]] = []
    gm = read_manifest(run / "greedy")
    if gm is not None and gm.get("status") == "complete":
        greedy = open_stage(run / "greedy", "sample").read(["prompt_id", "sample_idx", "text"]).to_pylist()
    slots: list[tuple[str, int, str, str]] = []
    for pid in dict.fromkeys(r["prompt_id"] for r in samples):
        p = prompts[pid]
        if p["target"] is not None:
            slots.append((pid, -1, "target", p["target"]))
        slots += [(pid, -2 - j, "negative", t or "") for j, t in enumerate(p["negatives"] or [])]
    slots += [(r["prompt_id"], r["sample_idx"], "sample", r["text"] or "") for r in samples]
    slots += [(r["prompt_id"], r["sample_idx"], "greedy", r["text"] or "") for r in greedy]
    return slots


def dedup_stats(slots: list[tuple[str, int, str, str]]) -> dict[str, Any]:
    """Share of encodes dedup saves: per prompt over its candidates (1 − unique/total), and overall."""
    by_prompt: dict[str, list[str]] = {}
    for pid, _, src, text in slots:
        if src == "sample":
            by_prompt.setdefault(pid, []).append(text)
    per = [1 - len(set(t)) / len(t) for t in by_prompt.values()]
    cands = sum(len(t) for t in by_prompt.values())
    uniq_within = sum(len(set(t)) for t in by_prompt.values())
    all_texts = [t for *_, t in slots]
    ns = sorted({len(t) for t in by_prompt.values()})
    return {"prompts": len(by_prompt), "n": ns, "candidates": cands,
            "cand_saved_within_prompt": 1 - uniq_within / cands,
            "per_prompt_mean": sum(per) / len(per), "per_prompt_min": min(per), "per_prompt_max": max(per),
            "all_saved_global": 1 - len(set(all_texts)) / len(all_texts),
            "all_unique_global": len(set(all_texts))}


def profile_negalign(run: Path, out: Path, embedder: str) -> list[str]:
    """Run `negalign embed` under cProfile into a scratch folder; return Markdown lines on where the time goes."""
    dest = out / "embeddings-profile"
    shutil.rmtree(dest, ignore_errors=True)
    prof = out / "embed.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "negalign", "embed", "--run", str(run),
           "--out", str(dest), "--embedder", embedder, "--batch-size", str(BATCH)]
    r = run_timed(cmd, out / "profile.log")
    st = pstats.Stats(str(prof))
    stats = st.stats  # type: ignore[attr-defined]

    def cum(pred) -> float:
        # cumulative time of the outermost matching calls (max, not sum: nested matches would double count)
        return max((v[3] for k, v in stats.items() if pred(k)), default=0.0)

    parts = {
        "whole `negalign embed` process (profiled)": r["wall_s"],
        "`negalign.embed.run`": cum(lambda k: k[0].endswith("negalign/embed.py") and k[2] == "run"),
        "`load_embedder` (model load)": cum(lambda k: k[2] == "load_embedder"),
        "`_encode` (all encode chunks)": cum(lambda k: k[0].endswith("negalign/embed.py") and k[2] == "_encode"),
        "  of it `SentenceTransformer.encode`": cum(lambda k: "sentence_transformers" in k[0] and k[2] == "encode"),
        "  of it the model forward (torch `Module.__call__`)": cum(
            lambda k: k[0].endswith("torch/nn/modules/module.py") and k[2] == "_wrapped_call_impl"),
        "  of it tokenisation (`tokenize`/`preprocess`)": cum(lambda k: "sentence_transformers" in k[0]
                                                              and k[2] in ("tokenize", "preprocess")),
        "`_shard_slots` (building the slots, all passes)": sum(v[3] for k, v in stats.items()
                                                                if k[2] == "_shard_slots"),
        "`text_sha` (hashing, all passes)": sum(v[3] for k, v in stats.items() if k[2] == "text_sha"
                                                and k[0].endswith("negalign/embed.py")),
        "`write_shard` (Parquet + fsync + sha256 + manifest)": cum(lambda k: k[2] == "write_shard"),
        "`open_stage` (reading inputs' manifests)": sum(v[3] for k, v in stats.items() if k[2] == "open_stage"),
    }
    parts["outside `run` (Python start, CLI imports, config, exit)"] = r["wall_s"] - parts["`negalign.embed.run`"]
    lines = ["| part of `negalign embed` (cProfile, one extra run; cProfile adds overhead) | cumulative s |",
             "|---|---:|"]
    lines += [f"| {name} | {s:.2f} |" for name, s in parts.items()]
    st.sort_stats("tottime")
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    lines.append("")
    lines.append("Top functions by own time: " + "; ".join(
        f"`{Path(k[0]).name}:{k[2]}` {v[2]:.2f} s" for k, v in top) + ".")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a run with complete prompts + samples [default: build OUT/run]")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "embed")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS_embed.md",
                    help="write the table as '## embed' into this Markdown file ('' to skip)")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="cProfile negalign embed: auto = when (a) is slower per unique text than (b)")
    ap.add_argument("--slow-ratio", type=float, default=0.8,
                    help="auto-profile when (a)'s unique texts/s is below this fraction of (b)'s texts/s")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of (a), (b), (c) in turn; each side's best round is reported (median beside)")
    ap.add_argument("--check-rows", type=int, default=8, help="spread rows listed in the vector check")
    ap.add_argument("--worker", choices=["plain"], help=argparse.SUPPRESS)
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=BATCH, help=argparse.SUPPRESS)
    ap.add_argument("--vectors", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "plain":
        return worker_plain(args)
    os.environ["HF_HUB_OFFLINE"] = "1"

    import numpy as np

    from negalign.models import resolve_model
    from negalign.store import open_stage, read_manifest

    started = dt.datetime.now().astimezone()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    built = args.run is None
    run = (out / "run") if built else args.run.resolve()
    run_note = build_run(run, out) if built else f"samples of {run}"
    slots = collect_slots(run)
    texts = [t for *_, t in slots]
    unique = list(dict.fromkeys(texts))
    (out / "texts_all.json").write_text(json.dumps(texts))
    (out / "texts_unique.json").write_text(json.dumps(unique))
    dd = dedup_stats(slots)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(args.embedder))
    ntok = dict(zip(unique, (len(x) for x in tok(unique)["input_ids"]), strict=True))
    tokens_all, tokens_unique = sum(ntok[t] for t in texts), sum(ntok.values())
    counts = Counter(texts)
    dup_len = [ntok[t] for t in texts if counts[t] > 1]            # every row whose text repeats
    model_path = resolve_model(args.embedder)

    emb_dir = run / "embeddings" if built else out / "embeddings"
    cmd_a = negalign("embed", "--run", str(run), "--embedder", args.embedder, "--batch-size", str(BATCH))
    if not built:
        cmd_a += ["--out", str(emb_dir)]

    def side_a() -> dict[str, Any]:
        """(a) negalign embed into a fresh folder; rows, unique texts and encode_s from its manifest."""
        shutil.rmtree(emb_dir, ignore_errors=True)   # a complete output would resume as a no-op
        r = run_timed(cmd_a, out / "negalign-embed.log")
        m = read_manifest(emb_dir)
        assert m is not None and m["status"] == "complete", f"{emb_dir}: embed did not complete"
        summ = m["summary"]
        if summ["rows"] != len(slots):
            sys.exit(f"negalign embedded {summ['rows']} rows, this script counted {len(slots)} slots")
        return {**r, "rows": summ["rows"], "unique": summ["unique_texts_encoded"],
                "dedup_saved": summ["dedup_saved"], "encode_s": float(m["timings"]["encode_s"])}

    def side_plain(side: str) -> dict[str, Any]:
        """(b) every text, (c) the unique texts: plain SentenceTransformer.encode in a subprocess."""
        file = "texts_all.json" if side == "b" else "texts_unique.json"
        result, vectors = out / f"plain-{side}.json", out / f"plain-{side}.npy"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "plain", "--texts", str(out / file),
               "--model-path", model_path, "--batch-size", str(BATCH), "--vectors", str(vectors),
               "--result", str(result)]
        r = run_timed(cmd, out / f"plain-{side}.log")
        return {**r, **json.loads(result.read_text()), "unique": len(unique) if side == "c" else len(texts)}

    load_before = os.getloadavg()
    rounds: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "c": []}
    for k in range(args.repeat):
        for side in ("a", "b", "c"):
            load_1m = os.getloadavg()[0]
            print(f"round {k + 1}/{args.repeat} ({side}) (load {load_1m:.2f}) ...", flush=True)
            r = side_a() if side == "a" else side_plain(side)
            r["load_1m"] = load_1m
            rounds[side].append(r)
            print(f"  encode {r['encode_s']:.2f} s, wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                  flush=True)
            time.sleep(2)
    load_after = os.getloadavg()

    def agg(rs: list[dict[str, Any]]) -> dict[str, Any]:
        """Best (lowest) encode time over the rounds (the least disturbed by other jobs), with the median and
        the worst; wall and CPU of that same round; the highest peak RSS; the load before that round."""
        best = min(rs, key=lambda r: r["encode_s"])
        return {**best, "encode_med": float(np.median([r["encode_s"] for r in rs])),
                "encode_max": max(r["encode_s"] for r in rs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "load_s": best.get("load_s", 0.0)}

    res = {side: agg(rs) for side, rs in rounds.items()}

    # vectors: negalign's stored row vs (b)'s vector of the same slot
    table = open_stage(emb_dir, "embed").read(["prompt_id", "sample_idx", "source", "text_sha", "embedding"])
    from negalign.embed import embeddings_array

    stored = embeddings_array(table)
    key_row = {k: i for i, k in enumerate(zip(table.column("prompt_id").to_pylist(),
                                              table.column("sample_idx").to_pylist(),
                                              table.column("source").to_pylist(), strict=True))}
    order = [key_row[(p, i, s)] for p, i, s, _ in slots]
    shas = table.column("text_sha").to_pylist()
    sha_ok = all(shas[j] == hashlib.sha256(t.encode()).hexdigest() for j, t in zip(order, texts, strict=True))
    plain_b = np.load(out / "plain-b.npy")
    plain_c = np.load(out / "plain-c.npy")
    cos_all = np.einsum("ij,ij->i", stored[order], plain_b) / (
        np.linalg.norm(stored[order], axis=1) * np.linalg.norm(plain_b, axis=1))
    pick = np.linspace(0, len(slots) - 1, min(args.check_rows, len(slots))).round().astype(int)
    uidx = {t: k for k, t in enumerate(unique)}
    cos_bc = np.einsum("ij,ij->i", plain_b, plain_c[[uidx[t] for t in texts]])

    for r in res.values():
        r["rows_s"] = len(slots) / r["encode_s"]          # input rows per second of encode time
        r["unique_s"] = r["unique"] / r["encode_s"]       # texts actually encoded per second

    a, b, c = res["a"], res["b"], res["c"]
    labels = {"a": "(a) `negalign embed` (dedup per shard)", "b": "(b) plain `encode`, every text",
              "c": "(c) plain `encode`, unique texts only"}
    lines = [f"| side | input rows | texts encoded | encode s, best of {args.repeat} (median; worst) "
             "| **texts/s** (input rows / best encode s) | encoded texts/s | wall s (incl. start + model load) "
             "| peak RSS MiB (highest) | CPU s (process) | load 1m before |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for side, r in res.items():
        lines.append(f"| {labels[side]} | {len(slots)} | {r['unique']} "
                     f"| {r['encode_s']:.2f} ({r['encode_med']:.2f}; {r['encode_max']:.2f}) | **{r['rows_s']:,.0f}** "
                     f"| {r['unique_s']:,.0f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:,.0f} | {r['cpu_s']:.1f} "
                     f"| {r['load_1m']:.2f} |")
    n_txt = "/".join(str(x) for x in dd["n"])
    notes = [
        "",
        f"- **a/b** (negalign over plain encode of every text, texts/s): **{a['rows_s'] / b['rows_s']:.2f}×**; "
        f"wall time b/a {b['wall_s'] / a['wall_s']:.2f}× (>1: negalign finishes sooner); peak RSS a/b "
        f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}×.",
        f"- Per text actually encoded, negalign runs at {a['unique_s'] / b['unique_s']:.2f}× plain (b)'s rate "
        f"and {a['unique_s'] / c['unique_s']:.2f}× plain (c)'s (its encode_s also covers re-reading, hashing and "
        "writing the shard).",
        f"- a/c (negalign over the best dedup can do with a plain encode): {a['rows_s'] / c['rows_s']:.2f}×; "
        f"c/b (what dedup buys with the plain encoder): {c['rows_s'] / b['rows_s']:.2f}×.",
        f"- Dedup on these real samples ({dd['prompts']} prompts × n = {n_txt}, {len(slots)} slots incl. "
        f"{len(slots) - dd['candidates']} targets/other): negalign encoded {a['unique']} unique texts of "
        f"{a['rows']} rows, **{a['dedup_saved']:.1%} of encodes saved** (manifest `dedup_saved`, per shard). "
        f"From the data: candidates only, 1 − unique/total within each prompt, overall "
        f"**{dd['cand_saved_within_prompt']:.1%}** (per prompt mean {dd['per_prompt_mean']:.1%}, min "
        f"{dd['per_prompt_min']:.1%}, max {dd['per_prompt_max']:.1%}); all slots, unique across the whole run "
        f"(what (c) encodes): {dd['all_saved_global']:.1%} ({dd['all_unique_global']} unique). In tokens "
        f"(the encoder's tokenizer, special tokens included) dedup saves only "
        f"{1 - tokens_unique / tokens_all:.1%} ({tokens_all:,} → {tokens_unique:,}): repeated texts are short "
        f"({np.mean(dup_len) if dup_len else 0:.1f} tokens on average vs {tokens_all / len(texts):.1f} overall), "
        "and the encoder's cost follows tokens (sentence-transformers sorts by length, so little padding).",
        f"- Vectors agree: cosine(negalign stored, plain (b)) over all {len(slots)} rows min "
        f"**{cos_all.min():.7f}** (max 1 − cos {1 - cos_all.min():.1e}); > 0.999 on every row: "
        f"{bool((cos_all > 0.999).all())}"
        f"; the {len(pick)} spread rows {pick.tolist()}: "
        + ", ".join(f"{cos_all[i]:.7f}" for i in pick)
        + f". text_sha = sha256(text) on every row: {sha_ok}. (b) vs (c) on the same text: min cosine "
        f"{cos_bc.min():.7f} (batch composition changes padding, so float rounding only).",
        f"- Model load + start: (b) {b['load_s']:.1f} s, (c) {c['load_s']:.1f} s inside their subprocess (wall − "
        f"encode); (a) wall − encode_s = {a['wall_s'] - a['encode_s']:.1f} s (CLI import, input reads, a hashing "
        "pass for the progress bar, model load).",
        f"- load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in load_after)} (shared machine: compare ratios from this one run, not "
        f"absolute times). Every round starts fresh processes (a, b, c in turn, {args.repeat} rounds); each side "
        "is reported at its best round (least disturbed by other jobs; wall, CPU and load of that round), with "
        "the median and worst encode times beside it; peak RSS is the highest of all rounds. Encode times per "
        "round (a/b/c, with the 1-min load before each): " + "; ".join(
            "/".join(f"{rounds[x][k]['encode_s']:.1f}" for x in "abc")
            + " s (" + "/".join(f"{rounds[x][k]['load_1m']:.1f}" for x in "abc") + ")"
            for k in range(args.repeat)) + ".",
        f"- With medians instead of best rounds: a/b {b['encode_med'] / a['encode_med']:.2f}×, "
        f"c/b {b['encode_med'] / c['encode_med']:.2f}×.",
        f"- {run_note}.",
    ]
    slow = a["unique_s"] < args.slow_ratio * b["unique_s"]
    prof_lines: list[str] = []
    if args.profile == "always" or (args.profile == "auto" and slow):
        print("profiling negalign embed under cProfile ...", flush=True)
        prof_lines = ["", f"Profile ({'negalign slower per unique text than (b)' if slow else '--profile always'}"
                      f"; `python -m cProfile -m negalign embed ...` into {out / 'embeddings-profile'}, "
                      f"stats in {out / 'embed.prof'}):", ""] + profile_negalign(run, out, args.embedder)
    table_md = "\n".join(lines + notes + prof_lines)
    print("\n" + table_md)

    if str(args.results) not in ("", "."):
        import sentence_transformers
        import torch

        cmd = ".venv/bin/python benchmarks/bench_embed.py " + " ".join(sys.argv[1:])
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
        machine = (f"`nproc` = {nproc} ({platform.machine()}), no GPU (device {b['device']}), "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; Python "
                   f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                   f"sentence-transformers {sentence_transformers.__version__}")
        source = (f"the run {run}" if not built else "a run built by the script (`negalign prepare` of "
                  "`examples/data/short_answers.jsonl`, then `negalign sample --engine hf -n 16 --max-tokens 32`)")
        intro = (
            f"Embedder `{args.embedder}` ({model_path}), batch size {BATCH}, on the real samples of "
            f"{source}: every "
            f"slot `embed` fills ({len(slots)} texts: candidates + targets). Each side its own subprocess, one "
            "after another in one run: (a) `python -m negalign embed --run RUN --batch-size 128` into a fresh "
            "folder (rows, unique texts and `timings.encode_s` from its manifest; encode_s starts after the "
            "model load and covers re-reading, hashing, encoding and writing the shard); (b) a plain "
            "`SentenceTransformer(str(path)).encode(all_texts, batch_size=128, normalize_embeddings=True)` on "
            "every text, no dedup, only that call timed; (c) the same on the unique texts only. texts/s = input "
            "rows per second of encode time (for every side the same rows); 'encoded texts/s' = texts actually "
            "encoded per second. Wall = the whole subprocess (Python start, imports, model load). Peak RSS = "
            "`ru_maxrss` of the subprocess (`wait4`), highest over the rounds. "
            f"{args.repeat} rounds (a, b, c in turn, fresh processes); each side at its best round.")
        text = (f"## embed\n\n{intro}\n\nDate: {started:%Y-%m-%d %H:%M %Z}. Machine: {machine}. Load average "
                f"before {', '.join(f'{x:.2f}' for x in load_before)}, after "
                f"{', '.join(f'{x:.2f}' for x in load_after)}.\n\n    {cmd}\n\n{table_md}\n")
        args.results.write_text(text)
        print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
