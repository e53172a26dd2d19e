"""Benchmark of `eval` generation against plain `sample` on the same prompts (issue 11; goal: ≥ 0.95×).

    .venv/bin/python benchmarks/bench_eval.py [--prompts 16] [--max-tokens 32] [--engines hf,vllm] [--repeat 2]
        [--threads 1] [--out benchmarks/out/eval] [--results benchmarks/RESULTS_eval.md]

Both sides are the CLI in a subprocess, one after the other, in ABBA order (sample, eval, eval, sample, …) so that
load drift on a shared machine hits both alike:

- ``sample``: ``negalign sample --greedy --prompts P --out X`` (one greedy answer per prompt);
- ``eval``: ``negalign eval --prompts P --name X --no-embed-sim`` (greedy by default; generation goes through the
  same ``sample.run``, then the exact-match checker and the summary with bootstrap intervals).

Generation tok/s = the sum of ``num_tokens`` over the answers / the ``timings.generate_s`` the sample stage records
(engine start excluded, as ``sample`` reports it). Wall = the whole subprocess (imports and engine start included).
For eval also: the scoring and summary time (``timings.score_s`` of the scores folder, plus the rest of the wall).
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
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "short_answers.jsonl"


def _manifest(folder: Path) -> dict:
    for name in ("_manifest.json", "manifest.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    raise SystemExit(f"{folder}: no manifest")


def _tokens(folder: Path) -> int:
    return sum(pq.read_table(f, columns=["num_tokens"]).column("num_tokens").to_numpy().sum()
               for f in sorted(folder.glob("part-*.parquet")))


def _cli(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "negalign", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"negalign {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="--threads for the HF engine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "eval")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS_eval.md")
    args = p.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    rows = DATA.read_text().splitlines()[:args.prompts]
    data = args.out / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    run = args.out / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    _cli(["prepare", "--run", str(run), "--input", str(data)], env)

    results: list[dict] = []
    for engine in args.engines.split(","):
        common = ["--run", str(run), "--prompts", str(run / "prompts"), "--engine", engine,
                  "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
        for r in range(args.repeat):
            for side in ("sample", "eval") if r % 2 == 0 else ("eval", "sample"):  # ABBA: drift hits both
                name = f"{side}-{engine}-{r}"
                if side == "sample":
                    gen = run / name
                    wall = _cli(["sample", *common, "--greedy", "--out", str(gen)], env)
                    score_s = None
                else:
                    wall = _cli(["eval", *common, "--name", name, "--no-embed-sim"], env)
                    gen = run / "eval" / name / "generations"
                    score_s = _manifest(run / "eval" / name / "scores")["timings"].get("score_s")
                m = _manifest(gen)
                gen_s = m["timings"]["generate_s"]
                tokens = int(_tokens(gen))
                engines = {e for f in gen.glob("part-*.parquet")
                           for e in pq.read_table(f, columns=["engine"]).column("engine").to_pylist()}
                results.append({"engine": engine, "side": side, "repeat": r, "tokens": tokens,
                                "generate_s": gen_s, "tok_s": tokens / gen_s if gen_s else 0.0, "wall_s": wall,
                                "score_s": score_s, "engine_used": ",".join(sorted(engines))})
                print(json.dumps(results[-1]), flush=True)

    lines = ["## eval: generation against plain `sample`", "",
             f"{dt.date.today()} · {platform.node()} · {os.cpu_count()} CPUs · load average "
             f"{os.getloadavg()[0]:.1f} at the end · {args.prompts} prompts of `examples/data/short_answers.jsonl`, "
             f"greedy, max {args.max_tokens} tokens, SmolLM2-135M-Instruct · {args.repeat} alternating repeats per "
             "side.", "",
             f"Command: `.venv/bin/python benchmarks/bench_eval.py --prompts {args.prompts} --max-tokens "
             f"{args.max_tokens} --engines {args.engines} --repeat {args.repeat} --threads {args.threads}`", "",
             "| engine | side | tokens | generate s | tok/s | wall s (whole command) | scoring + summary s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        score = "" if r["score_s"] is None else f"{r['score_s']:.2f}"
        lines.append(f"| {r['engine_used']} | {r['side']} | {r['tokens']} | {r['generate_s']:.2f} | {r['tok_s']:.1f} "
                     f"| {r['wall_s']:.1f} | {score} |")
    lines += ["", "| engine | eval tok/s ÷ sample tok/s (mean over repeats) | goal |", "|---|---|---|"]
    for engine in args.engines.split(","):
        s = [r["tok_s"] for r in results if r["engine"] == engine and r["side"] == "sample"]
        e = [r["tok_s"] for r in results if r["engine"] == engine and r["side"] == "eval"]
        ratio = (sum(e) / len(e)) / (sum(s) / len(s)) if s and e and sum(s) else float("nan")
        lines.append(f"| {engine} | {ratio:.3f} | ≥ 0.95 |")
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
