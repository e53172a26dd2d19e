"""`train`: every objective of SPEC §1 on prompt groups, with transformers' `Trainer` underneath.

One training item is one **group**: a prompt and the responses its objective needs, in a fixed layout
(`sft`: [chosen]; `dpo`/`ipo`/`sc`/`sr-*`: [chosen, rejected₁..K]; `selm`: [chosen, rejected₁..K, y_ref];
`d2o`: [anchor₁..K, negative₁..M]). `GroupCollator` lays a batch of groups out as one prompt-shared packed row
(`packing.pack`; `--no-share-prompt`: the padded oracle), `GroupTrainer.compute_loss` turns summed log-probs into
the objective's loss (`losses.py`). Reference log-probs come from the `ref_logps` cache, computed before training
with the starting model, so no reference model is held while training (with `--lora` the starting model *is* the
base with the adapter disabled). Checkpoints, LR schedule, `accelerate launch` and `report_to` are the Trainer's.

Output `RUN/models/NAME/`: an HF model folder (safetensors, tokenizer with chat template; LoRA merged), the
`_manifest.json` (stage "train", the resolved config, model fingerprint, summary) and `metrics.jsonl`. Checkpoints
go to `RUN/models/.NAME.checkpoints-CONFIGHASH/` (every rank writes its RNG state there; `--resume` only finds a
checkpoint of the same config) and are removed once the model is saved.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from negalign import losses
from negalign.config import TrainConfig, run_path
from negalign.console import console, progress
from negalign.errors import BadInput, NegalignError, UsageError
from negalign.faults import crash_point
from negalign.packing import num_model_tokens, pack, pad, sequence_logps
from negalign.selection import take_first_k
from negalign.stages import model_name, output_dir, stage_input
from negalign.store import StageOutput, open_stage, read_manifest

DPOP_OBJECTIVES = ("sc", "dpo")  # --dpop-lambda: the DPOP penalty is defined on the DPO logit
PAPER_DEFAULTS = {"selm": {"beta": 0.01, "alpha": 0.001}, "d2o": {"beta": 0.1, "alpha": 0.1}}
PREFERENCE_WARMUP_RATIO = 0.1  # the warm-up of common DPO recipes (issue 19: LoRA-DPO ~5e-6 with 10 % warmup)



# ----------------------------------------------------------------------------------------------- config

def resolved_hparams(cfg: TrainConfig) -> dict[str, Any]:
    """beta/alpha with the objective's paper defaults filled in."""
    d = PAPER_DEFAULTS.get(cfg.objective, {})
    return {"beta": cfg.beta if cfg.beta is not None else d.get("beta", 0.1),
            "alpha": cfg.alpha if cfg.alpha is not None else d.get("alpha", 0.1)}


def warmup(cfg: TrainConfig) -> tuple[int, float]:
    """(warmup steps, warmup ratio) as trained: `--warmup-steps` when given, else `--warmup-ratio`, whose default
    is 0.1 for the preference objectives (a cold start at the full rate moves the policy off the reference before the
    margins mean anything) and 0 for sft (its behaviour before the option existed)."""
    if cfg.warmup_steps:
        return cfg.warmup_steps, 0.0
    if cfg.warmup_ratio is not None:
        return 0, cfg.warmup_ratio
    return 0, 0.0 if cfg.objective == "sft" else PREFERENCE_WARMUP_RATIO


def displacement_warning(logged: list[dict[str, Any]], threshold: float = losses.DISPLACEMENT_THRESHOLD
                         ) -> tuple[float | None, float | None, str | None]:
    """(the chosen's mean `logratio/chosen_per_token` over the last `losses.displacement_window` logged steps;
    the lowest mean over any window of that many consecutive steps; the one-line warning when either is below
    `threshold`, else None). (None, None, None) when no step logged it (sft, d2o). A dip that recovered by the end
    still warns: in `make experiment` (2026-12-07) `sc` at lr 2e-4 dipped to −0.87 and ended at −0.07, and lost
    14.6 points on validation."""
    values = [r["logratio/chosen_per_token"] for r in logged if "logratio/chosen_per_token" in r]
    if not values:
        return None, None, None
    n = losses.displacement_window(len(values))
    means = losses.displacement_means(values)
    end, low = means[-1], min(means)
    fix = "add --sft-weight (e.g. 1) or --dpop-lambda, or lower --lr"
    if end < threshold:
        return end, low, (f"train: warning: likelihood displacement: the chosen answer's log-ratio to the reference "
                          f"averaged {end:.2f} nats/token over the last {n} logged step(s) (threshold {threshold}), "
                          f"so the model now gives its targets less probability than the starting model did; {fix}")
    if low < threshold:
        step = logged_steps(logged)[means.index(low) + n - 1]
        return end, low, (f"train: warning: likelihood displacement during the run: the chosen answer's log-ratio to "
                          f"the reference fell to {low:.2f} nats/token (mean of {n} steps, up to step {step}; "
                          f"threshold {threshold}) and ended at {end:.2f}; such runs can still lose accuracy, so "
                          f"check eval; {fix}")
    return end, low, None


def logged_steps(logged: list[dict[str, Any]]) -> list[int]:
    """The step numbers of the rows that logged the chosen's log-ratio, in order."""
    return [int(r.get("step", i + 1)) for i, r in enumerate(r for r in logged if "logratio/chosen_per_token" in r)]


# ----------------------------------------------------------------------------------------------- groups

@dataclass
class Item:
    """One tokenized group: the prompt, its responses in the objective's layout, and their reference log-probs."""

    prompt_id: str
    prompt: list[int]
    responses: list[list[int]]
    texts: list[str]
    prompt_q: list[int] | None = None  # Sr-*: quality prompt p ⊕ x
    ref: list[float] | None = None
    ref_q: list[float] | None = None


def truncate(prompt: list[int], responses: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]], int]:
    """Fit every `prompt + response` into `max_length`: keep the prompt's end (at least half the budget when the
    responses are long) and each response's start. Returns the new prompt, responses and how many sequences were cut."""
    longest = max((len(r) for r in responses), default=0)
    cut = sum(len(prompt) + len(r) > max_length for r in responses)
    if not cut:
        return prompt, responses, 0
    keep = min(len(prompt), max(max_length // 2, max_length - longest))
    prompt = prompt[-keep:]
    return prompt, [r[: max_length - keep] for r in responses], cut


def _layout(cfg: TrainConfig, row: dict[str, Any]) -> tuple[list[str] | None, str | None]:
    """The response texts of one input row in the objective's layout, or (None, skip reason)."""
    k = cfg.num_negatives
    if cfg.min_negatives and len(row.get("rejected") or []) < cfg.min_negatives:
        return None, "few_negatives"  # one fixed prompt set for every K, objective and --rejected
    if cfg.objective == "sft":
        target = row.get("chosen", row.get("target"))
        return ([target], None) if target is not None else (None, "no_target")
    if cfg.objective == "d2o":
        anchors, negatives = list(row.get("anchors") or []), list(row.get("negatives") or [])
        if len(anchors) < cfg.num_anchors:
            return None, "few_anchors"
        if len(negatives) < k:
            return None, "few_negatives"
        return anchors[: cfg.num_anchors] + negatives[:k], None
    if row.get("chosen") is None:
        return None, "no_target"
    rejected = list(row.get("negatives") if cfg.rejected == "given" else row.get("rejected")) or []
    keep, _ = take_first_k([rejected], k)
    if not keep:
        return None, "few_negatives"
    texts = [row["chosen"], *rejected[:k]]
    if cfg.objective == "selm":
        if row.get("y_ref") is None:
            return None, "no_y_ref"
        texts.append(row["y_ref"])
    return texts, None


def build_items(cfg: TrainConfig, rows: list[dict[str, Any]], tokenizer) -> tuple[list[Item], dict[str, int], int]:
    """Tokenize the groups; return the items, skipped groups by reason, and the number of truncated sequences."""
    from negalign.models import render_prompt_ids

    eos = tokenizer.eos_token_id
    quality = tokenizer(cfg.quality_prompt, add_special_tokens=False)["input_ids"] if cfg.objective in (
        "sr-dpo", "sr-ipo") else None
    items: list[Item] = []
    skipped: dict[str, int] = {}
    truncated = 0
    for row in rows:
        texts, reason = _layout(cfg, row)
        if texts is None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        prompt = render_prompt_ids(tokenizer, row["messages"])
        responses = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        p, rs, cut = truncate(prompt, responses, cfg.max_length)
        truncated += cut
        item = Item(row["prompt_id"], p, rs, texts)
        if quality is not None:  # p ⊕ x with the same responses; over budget, x loses its start, p stays
            budget = max(1, cfg.max_length - max(len(r) for r in rs) - len(quality))
            item.prompt_q = quality + p[-budget:]
            truncated += len(p) > budget
        items.append(item)
    return items, skipped, truncated


def read_input(cfg: TrainConfig) -> tuple[Any, list[dict[str, Any]]]:
    """The input stage (pairs, or for sft also prompts) and its rows."""
    path, _ = stage_input(cfg, "pairs")
    if cfg.pairs is None and cfg.objective == "sft" and read_manifest(path) is None:
        path = run_path(cfg, "prompts")
    manifest = read_manifest(path)
    if manifest is None:
        raise UsageError(f"{path}: no pairs here; run `negalign pair` first (sft also takes a prompts folder)")
    kind = manifest.get("stage")
    if kind == "prompts" and cfg.objective != "sft":
        raise UsageError(f"{path}: a prompts folder can only feed --objective sft; {cfg.objective} needs pairs")
    if kind not in ("pair", "prompts"):
        raise UsageError(f"{path}: holds a '{kind}' output; train reads a pair (or, for sft, a prompts) output")
    stage = open_stage(path, kind)
    rows = stage.read().to_pylist()
    for i, r in enumerate(rows):
        if not r.get("messages"):
            raise BadInput("empty prompt messages", file=str(path), row=i, column="messages")
    return stage, rows


def check_template(cfg: TrainConfig, input_stage: Any, template_sha: str) -> str | None:
    """The chat-template hash recorded upstream (pairs manifest, else the samples manifest); refuse a mismatch."""
    recorded = None
    sources = [input_stage.manifest]
    samples = read_manifest(stage_input(cfg, "samples")[0])
    if samples is not None:
        sources.append(samples)
    for m in sources:
        for block in (m.get("config", {}), m.get("info", {})):
            recorded = recorded or block.get("chat_template_sha") or block.get("chat_template_hash")
    if recorded and recorded != template_sha and not cfg.allow_template_mismatch:
        raise UsageError(f"the policy's chat template ({template_sha}) differs from the one the samples were made "
                         f"with ({recorded}); train with the sampling model's tokenizer, or pass "
                         "--allow-template-mismatch")
    return recorded


# ----------------------------------------------------------------------------------------------- reference log-probs

def attach_reference(cfg: TrainConfig, items: list[Item], get_model, *, ref_model: str, template_sha: str,
                     folder: Path) -> tuple[int, int]:
    """Fill `item.ref` (and `ref_q`) from the cache, computing what is missing with the model that `get_model()`
    returns (called only then). Returns (computed, reused)."""
    from negalign import ref_logps

    variant_q = "quality:" + ref_logps.text_sha(cfg.quality_prompt)[:12]
    needs: list[ref_logps.Need] = []
    for it in items:
        needs += [ref_logps.Need(it.prompt_id, "plain", it.prompt, r, t)
                  for r, t in zip(it.responses, it.texts, strict=True)]
        if it.prompt_q is not None:
            needs += [ref_logps.Need(it.prompt_id, variant_q, it.prompt_q, r, t)
                      for r, t in zip(it.responses, it.texts, strict=True)]
    cache = ref_logps.load(folder, ref_model)
    missing = [n for n in needs if n.key not in cache]
    unique_missing = len({n.key for n in missing})
    if missing:
        with progress() as bar:
            task = bar.add_task(f"reference log-probs → {folder}", total=unique_missing)
            cache.update(ref_logps.compute(get_model(), missing, folder, ref_model=ref_model,
                                           template_sha=template_sha, on_progress=lambda n: bar.advance(task, n)))
    for it in items:
        it.ref = [cache[ref_logps.tokens_sha(it.prompt, r)] for r in it.responses]
        if it.prompt_q is not None:
            it.ref_q = [cache[ref_logps.tokens_sha(it.prompt_q, r)] for r in it.responses]
    return unique_missing, len({n.key for n in needs}) - unique_missing


# ----------------------------------------------------------------------------------------------- trainer

class GroupDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]


@dataclass
class GroupCollator:
    """A batch of groups -> the model inputs of one step (packed, or padded with `share_prompt=False`)."""

    share_prompt: bool = True
    pad_id: int = 0

    def _layout(self, groups):
        return pack(groups) if self.share_prompt else pad(groups, self.pad_id)

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        batch: dict[str, Any] = {"main": self._layout([(it.prompt, it.responses) for it in items])}
        if items[0].ref is not None:
            batch["ref"] = torch.tensor([it.ref for it in items], dtype=torch.float64)
        if items[0].prompt_q is not None:
            batch["q"] = self._layout([(it.prompt_q, it.responses) for it in items])
            batch["ref_q"] = torch.tensor([it.ref_q for it in items], dtype=torch.float64)
        return batch


class GroupTrainer(Trainer):
    """`Trainer` whose loss is the `losses.LOSSES` entry of the objective, over a group of prompt-shared log-probs."""

    def __init__(self, *args, objective: str, params: losses.Params, **kwargs):
        super().__init__(*args, **kwargs)
        if objective not in losses.LOSSES:
            raise UsageError(f"unknown objective {objective!r}")
        self.objective, self.params = objective, params
        self.loss_is_scaled_for_ga = False  # our loss is a mean per step: Trainer divides by grad-accum steps
        self._metrics: dict[str, list[float]] = {}
        self.tokens_seen = 0

    def _record(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._metrics.setdefault(k, []).append(float(v))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps, counts = sequence_logps(model, inputs["main"])
        self.tokens_seen += num_model_tokens(inputs["main"])
        n = logps.shape[0]
        b = inputs["ref"].shape[0] if "ref" in inputs else n
        group = losses.Group(policy=logps.view(b, n // b), counts=counts.view(b, n // b))
        if "ref" in inputs:
            group.ref = inputs["ref"].to(logps.dtype)
        if "q" in inputs:  # Sr-*: the policy on p ⊕ x, without gradient (Δ is a stop-gradient)
            with torch.no_grad():
                lq, _ = sequence_logps(self.accelerator.unwrap_model(model), inputs["q"])
            self.tokens_seen += num_model_tokens(inputs["q"])
            group.policy_q, group.ref_q = lq.view(b, n // b), inputs["ref_q"].to(logps.dtype)
        loss, metrics = losses.group_loss(self.objective, group, self.params)
        metrics["num_tokens"] = float(self.tokens_seen)
        self._record(metrics)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            tokens = self._metrics.pop("num_tokens", [0.0])[-1]
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items()}, "num_tokens": tokens}
            self._metrics = {}
        super().log(logs, start_time)

    def _save_rng_state(self, output_dir):
        crash_point("checkpoint-save")  # model and optimizer are written, RNG and trainer state are not yet
        super()._save_rng_state(output_dir)


class ProgressAndMetrics(TrainerCallback):
    """A rich progress bar (loss, margin, accuracy, tokens/s, ETA) and `metrics.jsonl`, on the main process."""

    def __init__(self, trainer: GroupTrainer, metrics_file: Path):
        self.trainer, self.metrics_file = trainer, metrics_file
        self.bar = None
        self.task = None
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.bar = progress("tokens")
        self.bar.start()
        self.start_tokens = self.trainer.tokens_seen
        self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step, tokens=0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step,
                            tokens=self.trainer.tokens_seen - self.start_tokens)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
        if self.bar is not None and "loss" in logs:
            parts = [f"loss {logs['loss']:.4f}"]
            if "rewards/margin" in logs:
                parts += [f"margin {logs['rewards/margin']:+.3f}", f"acc {logs['rewards/accuracy']:.2f}"]
            self.bar.update(self.task, description="train " + " ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# ----------------------------------------------------------------------------------------------- checkpoints

def _safetensors_readable(f: Path) -> bool:
    """The file's header parses and its tensors fit in the file (a truncated or corrupt checkpoint fails this)."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as st:
            st.keys()
        return True
    except Exception:  # noqa: BLE001 - any failure to open means the checkpoint is not usable
        return False


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The highest `checkpoint-N` whose trainer state parses and whose weights exist and open; later, broken ones (a
    crash while saving, a corrupt file) are removed so that the Trainer's rotation and resume never see them."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in found:
        try:
            json.loads((p / "trainer_state.json").read_text())
            rng = (p / "rng_state.pth").exists() or any(p.glob("rng_state_*.pth"))
            weights = list(p.glob("*.safetensors"))
            complete = rng and bool(weights) and all(_safetensors_readable(f) for f in weights)
        except (OSError, json.JSONDecodeError):
            complete = False
        if complete:
            return p
        console.print(f"train: {p} is incomplete or damaged (a crash while saving?); removed, an earlier "
                      "checkpoint is used if there is one")
        shutil.rmtree(p, ignore_errors=True)
    return None


# ----------------------------------------------------------------------------------------------- run

def stage_config(cfg: TrainConfig, hparams: dict[str, Any], model_fp: str, template_sha: str,
                 ref_fp: str) -> dict[str, Any]:
    """What the trained model depends on (fingerprinted); run-time choices (sharing, saving, logging) are left out."""
    keys = ("objective", "num_negatives", "lam", "seed", "learning_rate", "lr_scheduler", "warmup_steps",
            "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "max_length", "lora", "sft_weight",
            "rejected", "bf16")
    out = {k: getattr(cfg, k) for k in keys}
    out.update(hparams)
    if cfg.dpop_lambda:  # only when on: runs without DPOP keep their fingerprints
        out["dpop_lambda"] = cfg.dpop_lambda
    if cfg.min_negatives:  # likewise
        out["min_negatives"] = cfg.min_negatives
    steps, ratio = warmup(cfg)
    out["warmup_steps"] = steps
    if ratio:  # only when non-zero: sft runs keep their fingerprints (preference runs default to 0.1: they change)
        out["warmup_ratio"] = ratio
    if cfg.objective == "d2o":
        out["num_anchors"] = cfg.num_anchors
    if cfg.objective in ("sr-dpo", "sr-ipo"):
        out["quality_prompt"] = cfg.quality_prompt
    if cfg.lora:
        out.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_targets=list(cfg.lora_targets))
    from negalign.models import model_label

    if cfg.objective != "sft" and ref_fp != model_fp:
        out.update(ref_model=model_label(cfg.ref_model or cfg.model), ref_model_fingerprint=ref_fp)
    return {**out, "base_model": model_label(cfg.model), "model_fingerprint": model_fp,
            "chat_template_sha": template_sha}


def training_arguments(cfg: TrainConfig, checkpoints: Path, device: str) -> TrainingArguments:
    """The Trainer's settings. Creating them also sets up the process group under `accelerate launch` / torchrun
    (gloo on CPU), so they come first."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps, ratio = warmup(cfg)
    return TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, lr_scheduler_type=cfg.lr_scheduler,
        # transformers 5.19 has no warmup_ratio: a warmup_steps value below 1 is the ratio of the total steps
        warmup_steps=steps or ratio,
        weight_decay=cfg.weight_decay, logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=1, report_to=[] if cfg.report_to == "none" else [cfg.report_to], seed=cfg.seed,
        data_seed=cfg.seed, bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, label_names=[],
        use_cpu=device == "cpu", ddp_backend="gloo" if device == "cpu" and world > 1 else None,
        ddp_find_unused_parameters=False)


def run(cfg: TrainConfig) -> Path:
    from accelerate import PartialState

    from negalign.models import chat_template_hash, load_causal_lm, load_tokenizer, model_fingerprint
    from negalign.store import fingerprint
    from negalign.threads import set_threads

    threads = set_threads(cfg.threads)
    if not cfg.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if cfg.objective == "dpo" and cfg.num_negatives != 1:
        raise UsageError("--objective dpo takes one rejected per prompt; use --objective sc for K > 1")
    if cfg.dpop_lambda and cfg.objective not in DPOP_OBJECTIVES:
        raise UsageError(f"--dpop-lambda applies to --objective {' or '.join(DPOP_OBJECTIVES)} (DPOP), not "
                         f"{cfg.objective}")
    if cfg.objective == "d2o" and cfg.rejected == "given":
        raise UsageError("--rejected applies to preference objectives; d2o always uses the given negatives")
    hparams = resolved_hparams(cfg)
    name = model_name(lambda option: getattr(cfg, option, None))
    out_dir = output_dir(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    input_stage, rows = read_input(cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    template_sha = chat_template_hash(tokenizer)
    check_template(cfg, input_stage, template_sha)
    model_fp = model_fingerprint(cfg.model)
    ref_fp = model_fingerprint(cfg.ref_model) if cfg.ref_model and cfg.objective != "sft" else model_fp
    if ref_fp != model_fp:
        ref_template = chat_template_hash(load_tokenizer(cfg.ref_model, trust_remote_code=cfg.trust_remote_code))
        if ref_template != template_sha and not cfg.allow_template_mismatch:
            raise UsageError(f"--ref-model {cfg.ref_model}: its chat template differs from --model {cfg.model}'s "
                             f"({ref_template[:12]} vs {template_sha[:12]}); --allow-template-mismatch overrides")
    config = stage_config(cfg, hparams, model_fp, template_sha, ref_fp)
    inputs = {"pairs" if input_stage.stage == "pair" else "prompts": input_stage.fingerprint}
    # Checkpoints sit beside the output, keyed by the config: every rank writes its RNG state there, and a
    # --resume never picks up another config's checkpoint.
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints-{fingerprint(config)[:12]}"
    args = training_arguments(cfg, checkpoints, device)
    state = PartialState()
    main = state.is_main_process
    world = state.num_processes

    out: StageOutput | None = None
    done = False
    if main:
        existing = read_manifest(out_dir)
        done = (existing is not None and existing.get("status") == "complete" and not cfg.overwrite
                and existing.get("config") == config and existing.get("inputs") == inputs)
        if done:
            console.print(f"train: {out_dir} is already complete (same config and inputs); --overwrite redoes it")
        else:
            out = StageOutput.open(out_dir, "train", config, inputs, overwrite=cfg.overwrite,
                                   info={"name": name, "share_prompt": cfg.share_prompt})
    done = bool(state.num_processes > 1 and _broadcast_flag(done)) or done
    if done:
        return out_dir
    resume_from = last_complete_checkpoint(checkpoints) if cfg.resume and main else None
    state.wait_for_everyone()
    if not main and cfg.resume:
        resume_from = last_complete_checkpoint(checkpoints)
    metrics_file = out.path / "metrics.jsonl" if out is not None else None
    if main and resume_from is None:  # a fresh start, also --resume with no complete checkpoint: no stale log lines
        shutil.rmtree(checkpoints, ignore_errors=True)
        assert metrics_file is not None
        metrics_file.unlink(missing_ok=True)
    state.wait_for_everyone()

    items, skipped, truncated = build_items(cfg, rows, tokenizer)
    if not items:
        why = ", ".join(f"{k} {v}" for k, v in skipped.items()) or "no rows"
        raise UsageError(f"{input_stage.path}: no group fits --objective {cfg.objective} --num-negatives "
                         f"{cfg.num_negatives} (skipped: {why})")
    if main:
        skipped_text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skipped.items()) or "none"
        console.print(f"train {cfg.objective}: {len(items)} groups from {input_stage.path}; skipped: "
                      f"{skipped_text}; sequences truncated to --max-length {cfg.max_length}: {truncated}")

    model = load_causal_lm(cfg.model, device="cpu", trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    ref_dir = Path(cfg.ref_logps) if cfg.ref_logps else run_path(cfg, "ref_logps")
    computed = reused = 0
    if cfg.objective != "sft":
        # The reference (the starting model unless --ref-model): main computes what the cache lacks, the others
        # then read it. A separate reference is loaded only for that and freed before training.
        def reference_model():
            ref = model if ref_fp == model_fp else load_causal_lm(cfg.ref_model, device="cpu",
                                                                   trust_remote_code=cfg.trust_remote_code)
            return ref.to(device)

        with state.main_process_first():
            computed, reused = attach_reference(cfg, items, reference_model, ref_model=ref_fp,
                                                template_sha=template_sha, folder=ref_dir)
            model.to("cpu")
        if main:
            console.print(f"reference log-probs: {computed} computed, {reused} reused from {ref_dir}")
    if cfg.lora:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(cfg.seed)  # LoRA's A matrices are drawn at random: same seed, same start
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 target_modules=list(cfg.lora_targets), lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))

    trainer = GroupTrainer(model=model, args=args, train_dataset=GroupDataset(items),
                           data_collator=GroupCollator(cfg.share_prompt, tokenizer.pad_token_id),
                           processing_class=tokenizer, objective=cfg.objective,
                           params=losses.Params(beta=hparams["beta"], alpha=hparams["alpha"], lam=cfg.lam,
                                                dpop_lambda=cfg.dpop_lambda, sft_weight=cfg.sft_weight,
                                                num_negatives=cfg.num_negatives, num_anchors=cfg.num_anchors))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if main and resume_from is not None and metrics_file is not None and metrics_file.exists():
        step = int(resume_from.name.split("-")[-1])  # drop log lines past the checkpoint: they will be redone
        lines = [ln for ln in metrics_file.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        metrics_file.write_text("".join(ln + "\n" for ln in lines))
        counts = [json.loads(ln)["num_tokens"] for ln in lines if "num_tokens" in json.loads(ln)]
        trainer.tokens_seen = int(counts[-1]) if counts else 0  # the token count goes on from the checkpoint
    trainer.add_callback(ProgressAndMetrics(trainer, metrics_file))
    if main and resume_from is not None:
        console.print(f"resuming from {resume_from}")

    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    elapsed = time.time() - t0
    state.wait_for_everyone()
    if not main:
        return out_dir
    assert out is not None and metrics_file is not None

    final = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.lora:
        final = final.merge_and_unload()
    final.config.use_cache = True
    for f in out.path.glob("*.safetensors"):
        f.unlink()
    final.save_pretrained(out.path, safe_serialization=True)
    tokenizer.save_pretrained(out.path)
    steps = trainer.state.global_step
    logged = [json.loads(ln) for ln in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    losses_seen = [r["loss"] for r in logged if "loss" in r]
    first_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    chosen_tail, chosen_low, warning = displacement_warning(logged)
    summary = {"groups": len(items), "skipped": skipped, "truncated_sequences": truncated, "steps": steps,
               "chosen_logratio_per_token_last": chosen_tail, "chosen_logratio_per_token_min": chosen_low,
               "likelihood_displacement": warning is not None,
               # the mean over every logged step, also across a --resume (the Trainer's covers this process only)
               "train_loss": sum(losses_seen) / len(losses_seen) if losses_seen else result.training_loss,
               "first_loss": losses_seen[0] if losses_seen else None,
               "last_loss": losses_seen[-1] if losses_seen else None, "ref_logps_computed": computed,
               "ref_logps_reused": reused, "seconds": round(elapsed, 2),
               "seconds_per_step": round(elapsed / max(1, steps - first_step), 3),
               "threads": threads, "world_size": world, "share_prompt": cfg.share_prompt,
               "trained_model_fingerprint": model_fingerprint(str(out.path))}
    out.finish(0, timings={"train_s": round(elapsed, 2)}, summary=summary)
    shutil.rmtree(checkpoints, ignore_errors=True)
    console.print(f"train: {steps} steps in {elapsed:.1f} s "
                  f"({summary['seconds_per_step']:.2f} s/step), loss {summary['first_loss']} → "
                  f"{summary['last_loss']}; model → {out_dir}")
    if warning:
        console.print(warning, markup=False)
    if not math.isfinite(result.training_loss):
        raise NegalignError(f"training loss is {result.training_loss}; lower --lr")
    return out_dir


def _broadcast_flag(flag: bool) -> bool:
    """Rank 0's boolean, on every rank."""
    import torch.distributed as dist

    objs = [flag]
    dist.broadcast_object_list(objs, src=0)
    return bool(objs[0])
