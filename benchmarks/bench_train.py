"""Benchmark of `negalign train` against the alternatives (issue 10's Benchmark section), all in one run.

    .venv/bin/python benchmarks/bench_train.py [--prompts 16] [--steps 6] [--threads 1] [--results FILE]

Data: a synthetic pairs run written through the store (like tests/test_train.py): `--prompts` groups, each a
~46-token prompt, a 5-15-token chosen answer and 8 rejected answers of 5-15 tokens, on the real default model
(SmolLM2-135M-Instruct), fp32 unless said otherwise. Every variant runs the real command in its own subprocess:

1. `sc` K = 8 with prompt sharing (the default), the same with `--no-share-prompt`, and the reference code's pair
   expansion: `dpo` on the K pairs of each group written as K one-negative groups, `--no-share-prompt`, with K times
   the batch size, so that every step sees the same prompts and responses (each pair recomputes y* and the prompt).
2. `dpo` K = 1 against TRL 1.16 `DPOTrainer` on the same pairs (the TRL export: prompt/chosen/rejected, the first
   rejected of each group), same max_length, batch size, learning rate and optimizer (TrainingArguments' default):
   TRL's defaults with `bf16=False` (gradient checkpointing on, reference model run online), TRL tuned
   (`precompute_ref_log_probs=True`, no gradient checkpointing), and TRL's bf16 default reported separately.
3. `sc` K = 8 with `--lora` against full fine-tuning, and `--lora --gradient-checkpointing` (TRL's default
   checkpoints activations too).

Per step: the time between the starts of consecutive `Trainer.training_step` calls (forward, backward, optimizer
step, next batch), median over the steps after the first; tokens through the model (padding excluded; TRL's online
reference forward counted); peak RSS (VmHWM) of the process, model loading and reference log-probs included.
negalign's reference log-probs are computed before training (and cached in RUN/ref_logps): outside the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from negalign.pair import PAIR_SCHEMA  # noqa: E402
from negalign.store import PROMPTS_SCHEMA, StageOutput  # noqa: E402

# Runs inside each variant's process: per-step timestamps and tokens, reported at exit.
PRELUDE = r'''
import atexit, json, sys, time
import torch
import transformers
steps = []
real_step = transformers.Trainer.training_step
def training_step(self, model, inputs, *a, **k):
    t = time.perf_counter()
    out = real_step(self, model, inputs, *a, **k)
    tokens = getattr(self, "tokens_seen", None)
    if tokens is None:      # TRL: non-padding tokens of the batch (x2 when the reference model runs online)
        tokens = sum(int(v.sum()) for key, v in inputs.items() if key.endswith("attention_mask"))
        tokens *= 2 if (self.ref_model is not None and not self.args.precompute_ref_log_probs) else 1
        tokens += steps[-1][1] if steps else 0
    steps.append((t, tokens, float(out.detach()) if hasattr(out, "detach") else float(out)))
    return out
transformers.Trainer.training_step = training_step
def report():
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print("BENCH " + json.dumps({"steps": steps, "peak_rss_mib": hwm / 1024}), file=sys.stderr)
atexit.register(report)
'''

NEGALIGN = PRELUDE + r'''
from negalign.cli import app
app(sys.argv[1:], prog_name="negalign")
'''

TRL = PRELUDE + r'''
import datasets
from trl import DPOConfig, DPOTrainer
from negalign.models import load_causal_lm, load_tokenizer
opts = json.loads(sys.argv[1])
torch.set_num_threads(opts.pop("threads"))
tokenizer = load_tokenizer("smollm2-135m")
model = load_causal_lm("smollm2-135m")
data = datasets.load_dataset("parquet", data_files=opts.pop("data"), split="train")
args = DPOConfig(output_dir=opts.pop("out"), report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                 seed=0, disable_tqdm=True, **opts)
trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
trainer.train()
'''

WORDS = ("the a river stone light quick blue seven under over city garden number answer small large early late "  # noqa: SIM905
         "north south paper window music silver green cold warm bright quiet open closed").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def build_run(run: Path, prompts: int, k: int, seed: int = 0) -> Path:
    """RUN/prompts, RUN/pairs (K rejected per group), RUN/pairs_expanded (K one-negative groups per group) and the
    TRL export of the first pair of each group."""
    rng = random.Random(seed)
    prompt_rows, groups, expanded, trl = [], [], [], []
    for i in range(prompts):
        msgs = [{"role": "user", "content": f"Question {i}: {sentence(rng, 30)} Answer in one short sentence."}]
        chosen = sentence(rng, rng.randint(4, 12))
        rejected = [sentence(rng, rng.randint(4, 12)) for _ in range(k)]
        pid = f"p{i:04d}"
        prompt_rows.append({"prompt_id": pid, "messages": msgs, "target": chosen, "negatives": None})
        group = {"prompt_id": pid, "messages": msgs, "chosen": chosen, "rejected": rejected,
                 "rejected_sim": [0.1] * k, "rejected_idx": list(range(k)), "num_kept": k, "anchors": [],
                 "negatives": [], "y_ref": None}
        groups.append(group)
        expanded += [{**group, "prompt_id": f"{pid}-{j}", "rejected": [r], "rejected_sim": [0.1],
                      "rejected_idx": [j], "num_kept": 1} for j, r in enumerate(rejected)]
        trl.append({"prompt": msgs, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected[0]}]})
    for name, stage, rows, schema in (("prompts", "prompts", prompt_rows, PROMPTS_SCHEMA),
                                      ("pairs", "pair", groups, PAIR_SCHEMA),
                                      ("pairs_expanded", "pair", expanded, PAIR_SCHEMA)):
        out = StageOutput.open(run / name, stage, {"bench": seed, "name": name})
        out.write_shard(0, pa.Table.from_pylist(rows, schema=schema))
        assert out.finish(1)
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(trl), run / "trl.parquet")
    return run


# glibc keeps freed activation memory in its heap once its mmap threshold has grown (up to 32 MiB); a fixed
# threshold returns every large block to the system when it is freed: lower peak RSS, more page faults.
LOW_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_variant(code: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed: {args[:6]}\n{proc.stderr[-4000:]}")
    bench = next(json.loads(line[6:]) for line in proc.stderr.splitlines() if line.startswith("BENCH "))
    steps = bench["steps"]
    times = [b[0] - a[0] for a, b in zip(steps, steps[1:], strict=False)]
    tokens = [b[1] - a[1] for a, b in zip(steps, steps[1:], strict=False)] or [steps[0][1]]
    return {"s_per_step": statistics.median(times[1:] or times), "tokens_per_step": statistics.median(tokens),
            "peak_rss_mib": bench["peak_rss_mib"], "losses": [round(s[2], 4) for s in steps], "wall_s": wall,
            "steps": len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2, help="groups per step for sc (pair expansion: x K)")
    ap.add_argument("--dpo-batch-size", type=int, default=4, help="pairs per step, negalign dpo and TRL")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    run = build_run(tmp / "run", args.prompts, args.k)
    common = ["--run", str(run), "--max-steps", str(args.steps), "--lr", str(args.lr), "--max-length",
              str(args.max_length), "--threads", str(args.threads), "--save-steps", "1000",
              "--warmup-ratio", "0"]  # TRL's DPOConfig warms up for 0 steps: the same schedule on both sides
    k, b = str(args.k), args.batch_size
    variants = {
        "sc K=8, prompt shared": (NEGALIGN, ["train", "--objective", "sc", "--num-negatives", k,
                                             "--batch-size", str(b), "--name", "sc_shared", *common]),
        "sc K=8, not shared": (NEGALIGN, ["train", "--objective", "sc", "--num-negatives", k, "--batch-size", str(b),
                                          "--no-share-prompt", "--name", "sc_unshared", *common]),
        "pair expansion (dpo on K pairs)": (NEGALIGN, [
            "train", "--objective", "dpo", "--pairs", str(run / "pairs_expanded"), "--batch-size",
            str(b * args.k), "--no-share-prompt", "--name", "expanded", *common]),
        "sc K=8, prompt shared, LoRA": (NEGALIGN, ["train", "--objective", "sc", "--num-negatives", k,
                                                   "--batch-size", str(b), "--lora", "--name", "sc_lora", *common]),
        "sc K=8, prompt shared, LoRA + gradient checkpointing": (NEGALIGN, [
            "train", "--objective", "sc", "--num-negatives", k, "--batch-size", str(b), "--lora",
            "--gradient-checkpointing", "--name", "sc_lora_gc", *common]),
        "negalign dpo": (NEGALIGN, ["train", "--objective", "dpo", "--batch-size", str(args.dpo_batch_size),
                                    "--name", "dpo", *common]),
        "negalign dpo, MALLOC_MMAP_THRESHOLD_=131072": (NEGALIGN, [
            "train", "--objective", "dpo", "--batch-size", str(args.dpo_batch_size), "--name", "dpo_lowmem",
            *common], LOW_MEMORY_ENV),
        "sc K=8, prompt shared, LoRA, MALLOC_MMAP_THRESHOLD_=131072": (NEGALIGN, [
            "train", "--objective", "sc", "--num-negatives", k, "--batch-size", str(b), "--lora", "--name",
            "sc_lora_lowmem", *common], LOW_MEMORY_ENV),
    }
    trl_common = {"data": str(run / "trl.parquet"), "per_device_train_batch_size": args.dpo_batch_size,
                  "max_steps": args.steps, "learning_rate": args.lr, "max_length": args.max_length,
                  "threads": args.threads}
    for name, extra in (("TRL DPOTrainer defaults, bf16=False", {"bf16": False}),
                        ("TRL DPOTrainer tuned (precomputed ref, no checkpointing)",
                         {"bf16": False, "precompute_ref_log_probs": True, "gradient_checkpointing": False}),
                        ("TRL DPOTrainer defaults (bf16)", {})):
        opts = {**trl_common, **extra, "out": str(tmp / f"trl_{len(variants)}")}
        variants[name] = (TRL, [json.dumps(opts)])
    results = {}
    for name, (code, argv, *env) in variants.items():
        if args.only and name not in args.only:
            continue
        results[name] = run_variant(code, argv, *env)
        print(name, json.dumps(results[name]), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    text = markdown(results, args)
    print(text)
    if args.results:
        args.results.write_text(text)


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = ["| variant | s/step | tokens/step | peak RSS MiB | losses (first steps) |", "|---|---:|---:|---:|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {r['tokens_per_step']:,.0f} | {r['peak_rss_mib']:,.0f} "
                     f"| {', '.join(f'{x:.3f}' for x in r['losses'][:4])} |")

    def ratio(a: str, b: str, key: str = "s_per_step") -> str:
        return f"{results[b][key] / results[a][key]:.2f}" if a in results and b in results else "n/a"

    shared, trl_d, trl_t = "sc K=8, prompt shared", "TRL DPOTrainer defaults, bf16=False", \
        "TRL DPOTrainer tuned (precomputed ref, no checkpointing)"
    lora_gc = "sc K=8, prompt shared, LoRA + gradient checkpointing"
    notes = [
        f"- sc K=8: pair expansion / prompt shared = **{ratio(shared, 'pair expansion (dpo on K pairs)')}x** "
        f"(goal >= 3); not shared / shared = {ratio(shared, 'sc K=8, not shared')}x.",
        f"- dpo: TRL defaults (fp32) / negalign = **{ratio('negalign dpo', trl_d)}x** (goal >= 3); TRL tuned / "
        f"negalign = **{ratio('negalign dpo', trl_t)}x** (goal >= 2.5); negalign peak RSS / TRL defaults = "
        + (f"{results['negalign dpo']['peak_rss_mib'] / results[trl_d]['peak_rss_mib']:.2f}"
           if 'negalign dpo' in results and trl_d in results else "n/a") + " (goal <= 0.85).",
        "- LoRA: peak RSS LoRA / TRL defaults = "
        + (f"{results['sc K=8, prompt shared, LoRA']['peak_rss_mib'] / results[trl_d]['peak_rss_mib']:.2f}"
           if 'sc K=8, prompt shared, LoRA' in results and trl_d in results else "n/a")
        + f" (goal <= 0.5); s/step LoRA / full = {ratio(shared, 'sc K=8, prompt shared, LoRA')}.",
        "- LoRA + gradient checkpointing (TRL's default checkpoints too): peak RSS / TRL defaults = "
        + (f"{results[lora_gc]['peak_rss_mib'] / results[trl_d]['peak_rss_mib']:.2f}"
           if lora_gc in results and trl_d in results else "n/a")
        + f" (goal <= 0.5); s/step / LoRA alone = {ratio('sc K=8, prompt shared, LoRA', lora_gc)}.",
    ]
    for name, base in (("negalign dpo, MALLOC_MMAP_THRESHOLD_=131072", "negalign dpo"),
                       ("sc K=8, prompt shared, LoRA, MALLOC_MMAP_THRESHOLD_=131072", "sc K=8, prompt shared, LoRA")):
        if name in results and trl_d in results and base in results:
            notes.append(f"- {name}: peak RSS / TRL defaults = "
                         f"{results[name]['peak_rss_mib'] / results[trl_d]['peak_rss_mib']:.2f} "
                         f"(without it {results[base]['peak_rss_mib'] / results[trl_d]['peak_rss_mib']:.2f}); "
                         f"s/step / without = {ratio(base, name)}.")
    cmd = "    .venv/bin/python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    head = (f"{args.prompts} synthetic groups (K = {args.k}), {args.steps} steps per variant, sc batch "
            f"{args.batch_size} groups, dpo batch {args.dpo_batch_size} pairs, lr {args.lr}, "
            f"max_length {args.max_length}, "
            f"{args.threads} torch thread(s). Machine: {os.cpu_count()} cores ({platform.machine()}), load average "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end (shared: compare ratios, not times).")
    return "\n".join([head, "", cmd, "", *lines, "", *notes, ""])


if __name__ == "__main__":
    main()
