"""The reward model: one scorer for `eval` (win rate, σ(reward)) and SELM's `rank` (chosen = best, rejected = worst).

Any HF sequence-classification model on disk (or an alias/hub id that `models.resolve_model` knows), scoring a
(prompt, answer) rendered with the reward model's own chat template (plain "role: content" turns when it has none).
The reward is the single logit, or logit(good) − logit(bad) for a two-label model; rows are batched by length with
a pad token set, so the score of an answer does not depend on its batch.
"""

from __future__ import annotations

from negalign.errors import UsageError
from negalign.models import best_device, resolve_model


class RewardModel:
    """Any HF sequence-classification model on disk, scoring (prompt, answer) rendered with its chat template."""

    def __init__(self, path: str, *, batch_size: int = 8, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch, self.batch_size = torch, batch_size
        resolved = resolve_model(path)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = best_device()
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolved, use_safetensors=True, trust_remote_code=trust_remote_code).to(self.device).eval()
        if self.model.config.pad_token_id is None:  # needed to find each row's last token in a padded batch
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.num_labels = int(self.model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise UsageError(f"{path}: a reward model has 1 output (or 2: bad/good), this one has {self.num_labels}")

    def render(self, messages: list[dict[str, str]], answer: str) -> str:
        chat = [*messages, {"role": "assistant", "content": answer}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in chat)

    def score(self, messages: list[list[dict[str, str]]], answers: list[str]) -> list[float]:
        """The reward of each (prompt, answer): the single logit, or logit(good) − logit(bad) for two labels."""
        torch = self.torch
        texts = [self.render(m, a) for m, a in zip(messages, answers, strict=True)]
        out: list[float] = [0.0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        max_len = getattr(self.tokenizer, "model_max_length", 4096)
        max_len = max_len if isinstance(max_len, int) and max_len < 100_000 else 4096
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                 max_length=max_len, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            values = logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]
            for i, v in zip(idx, values.tolist(), strict=True):
                out[i] = float(v)
        return out
