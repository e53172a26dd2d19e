"""GPU check (`make gpu-check`): train, HF sampling and embed on CUDA, with throughput, peak GPU memory and MFU.

    python benchmarks/gpu_check.py [--steps 8] [--groups 32] [--workdir DIR]     # CUDA, ~1B model, <= 8 minutes
    python benchmarks/gpu_check.py --tiny                                          # CPU, tiny model (the tests)

Needs only torch, transformers, peft, sentence-transformers, pyarrow and negalign's pure-Python dependencies
(typer, rich, pyyaml, ...): no vLLM, no FAISS, no network, no model hub. Everything is built in code:
- a byte-level BPE tokenizer trained on synthetic words, with a small chat template;
- a randomly initialised Llama-shaped policy: hidden 2048, 22 layers, 32 heads (4 KV heads), MLP 5632 (TinyLlama's
  shape, ~1.0B parameters; the vocabulary is the tokenizer's, so every sampled id decodes); `--tiny`: 2 layers,
  hidden 64;
- a randomly initialised MiniLM-shaped embedder (BERT, 6 layers, hidden 384, mean pooling) as a
  sentence-transformers folder;
- synthetic prompts and pairs (K = 8) written through the store (`bench_train.build_run`).

Then, each a real `python -m negalign ...` subprocess: `train --objective sc --num-negatives 8 --bf16` prompt-shared,
`--no-share-prompt`, and as pair expansion (`dpo` on the K pairs of each group as one-negative groups, K times the
batch); `sample --engine hf`; `embed`. Printed per command: tokens/s (train: tokens through the model per second of
training step, median; sample: generated tokens per second of the command; embed: texts per second), peak GPU
memory (torch.cuda.max_memory_allocated), and MFU = achieved FLOP/s / the GPU's dense bf16 peak, with FLOPs per
token = 6 x parameters for training and 2 x parameters for generation (attention FLOPs left out: a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import NEGALIGN, build_run  # noqa: E402

# Dense bf16 peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(); vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "B200": 2250.0}

GPU_REPORT = r'''
import atexit as _atexit
def _gpu_report():
    import torch
    if torch.cuda.is_available():
        print("GPU " + json.dumps({"peak_gib": torch.cuda.max_memory_allocated() / 2**30}), file=sys.stderr)
_atexit.register(_gpu_report)
'''
CODE = NEGALIGN.replace("from negalign.cli import app", GPU_REPORT + "from negalign.cli import app")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def peak_tflops(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def build_tokenizer(folder: Path, vocab: int) -> int:
    """Byte-level BPE trained on the synthetic words; returns its vocabulary size."""
    from bench_train import WORDS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(20)) + f" Question {i}. Answer." for i in
              range(2000)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   bos_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return len(fast)


def build_models(work: Path, tiny: bool) -> tuple[Path, Path, int]:
    """The policy folder, the embedder folder and the policy's parameter count."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    policy, embedder = work / "policy", work / "embedder"
    vocab = build_tokenizer(policy, 2000 if tiny else 8000)
    tok = AutoTokenizer.from_pretrained(policy)
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if tiny else
             dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4))
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(policy, safe_serialization=True)
    del model
    bert = BertConfig(vocab_size=vocab, hidden_size=32 if tiny else 384, num_hidden_layers=2 if tiny else 6,
                      num_attention_heads=4 if tiny else 12, intermediate_size=64 if tiny else 1536,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    (embedder / "bert").mkdir(parents=True, exist_ok=True)
    BertModel(bert).save_pretrained(embedder / "bert", safe_serialization=True)
    tok.save_pretrained(embedder / "bert")
    word = st_models.Transformer(str(embedder / "bert"), max_seq_length=128)
    st = SentenceTransformer(modules=[word, st_models.Pooling(word.get_word_embedding_dimension(), "mean"),
                                      st_models.Normalize()], device="cpu")
    st.save(str(embedder / "st"))
    return policy, embedder / "st", params


def run(args: list[str], timeout: float) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CODE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                                "PYTHONPATH": os.pathsep.join(filter(None, [
                                                    str(ROOT), os.environ.get("PYTHONPATH", "")]))})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"negalign {' '.join(args[:3])} failed:\n{proc.stderr[-4000:]}")
    out: dict = {}
    for line in proc.stderr.splitlines():
        if line.startswith("BENCH "):
            out.update(json.loads(line[6:]))
        if line.startswith("GPU "):
            out.update(json.loads(line[4:]))
    return out, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, a few steps; runs on a CPU (the test suite)")
    ap.add_argument("--steps", type=int, default=None, help="train steps per variant [default: 8, tiny 2]")
    ap.add_argument("--groups", type=int, default=None, help="synthetic groups (K = 8) [default: 64, tiny 4]")
    ap.add_argument("--batch-size", type=int, default=None, help="groups per step [default: 4, tiny 2]")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("gpu-check: no CUDA device (torch.cuda.is_available() is False); --tiny runs on a CPU")
    steps, groups = args.steps or (2 if args.tiny else 8), args.groups or (4 if args.tiny else 64)
    batch, k = args.batch_size or 2 if args.tiny else args.batch_size or 4, 8
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t_start = time.time()
    policy, embedder, params = build_models(work, args.tiny)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(device) if cuda else None
    print(f"device: {device}; policy {params / 1e6:,.1f} M parameters; bf16 peak "
          + (f"{peak:.0f} TFLOP/s" if peak else "unknown for this device (MFU not computed)"), flush=True)
    run_dir = build_run(work / "run", groups, k)
    limit = 60 if args.tiny else 150
    common = ["--run", str(run_dir), "--model", str(policy), "--max-steps", str(steps), "--max-length", "256",
              "--save-steps", "100000", "--lr", "1e-5", *(["--bf16"] if cuda else ["--threads", "1"])]
    variants = {
        "sc K=8, prompt shared": ["--objective", "sc", "--num-negatives", str(k), "--batch-size", str(batch),
                                  "--name", "shared"],
        "sc K=8, not shared": ["--objective", "sc", "--num-negatives", str(k), "--batch-size", str(batch),
                               "--no-share-prompt", "--name", "unshared"],
        "pair expansion (dpo on K pairs)": ["--objective", "dpo", "--pairs", str(run_dir / "pairs_expanded"),
                                            "--batch-size", str(batch * k), "--no-share-prompt", "--name",
                                            "expanded"],
    }
    rows = []
    for name, extra in variants.items():
        r, wall = run(["train", *common, *extra], limit)
        st = r["steps"]
        times = [b[0] - a[0] for a, b in zip(st, st[1:], strict=False)] or [wall]
        tokens = [b[1] - a[1] for a, b in zip(st, st[1:], strict=False)] or [st[0][1]]
        s_step, tok_step = statistics.median(times[1:] or times), statistics.median(tokens)
        rows.append((f"train {name}", tok_step / s_step, r.get("peak_gib"), 6 * params * tok_step / s_step, wall))
    tokens_max = "4" if args.tiny else "64"
    r, wall = run(["sample", "--run", str(run_dir), "--model", str(policy), "--engine", "hf", "-n", "2" if args.tiny
                   else "8", "--max-tokens", tokens_max, "--batch-size", "64", *([] if cuda else ["--threads", "1"])],
                  limit)
    import pyarrow.parquet as pq

    samples = pq.read_table(run_dir / "samples", columns=["num_tokens"])
    generated = sum(samples.column("num_tokens").to_pylist())
    rows.append(("sample --engine hf (tokens/s of the command, loading included)", generated / wall,
                 r.get("peak_gib"), 2 * params * generated / wall, wall))
    r, wall = run(["embed", "--run", str(run_dir), "--embedder", str(embedder)], limit)
    texts = sum(pq.read_metadata(f).num_rows for f in (run_dir / "embeddings").glob("*.parquet"))
    rows.append(("embed (texts/s of the command)", texts / wall, r.get("peak_gib"), None, wall))
    print("| command | tokens/s | peak GPU GiB | MFU | wall s |\n|---|---:|---:|---:|---:|")
    for name, rate, mem, flops, wall in rows:
        mfu = f"{flops / (peak * 1e12):.1%}" if (flops and peak) else "n/a"
        print(f"| {name} | {rate:,.0f} | {mem if mem is not None else float('nan'):.1f} | {mfu} | {wall:.0f} |")
    print(f"gpu-check: done in {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
