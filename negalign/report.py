"""`report`: every evaluated model of a run in one table, plots, and paired comparisons (issue 11).

Reads only `RUN/eval/*/summary.json` and `RUN/eval/*/scores` (each summary carries its model's training config).
Writes `RUN/report/report.md` and PNGs next to it, and prints the table in the terminal.

- Models are grouped when their training config differs only by the seed (and the eval settings match): a group
  shows mean ± standard error over seeds, with the per-seed values. A single model shows its bootstrap 95 %
  interval over prompts.
- Models are ordered and labelled by training config: objective, then K (num_negatives), then β.
- Plots: the metric against K for the `sc` models (the Self-Contrast paper's main figure; other models as
  horizontal reference lines), each metric per model, and the answer-length distribution per model.
- `--against A B`: per-prompt paired comparison of two eval folders on their shared prompts: win/tie/loss by checker,
  embed-sim and reward, the mean difference A − B with a paired bootstrap 95 % interval, and McNemar's exact p for
  checker accuracy. `--compare A:B` (repeatable) adds more pairs, with one summary table of all of them.
- The displacement picture: per training step, the chosen answer's log-ratio to the reference per token (the
  preference models; `train`'s warning threshold as a line) and the chosen's summed log-prob (every trained model),
  from each evaluated model's `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from negalign import stats, store
from negalign.config import ReportConfig
from negalign.console import console
from negalign.errors import UsageError
from negalign.stages import output_dir
from negalign.store import atomic_write_text, open_stage, read_manifest

# (summary key, label, shown as a percentage)
METRICS: list[tuple[str, str, bool]] = [
    ("accuracy", "accuracy", True), ("embed_sim", "embed-sim", False), ("win_rate", "win rate", True),
    ("reward_sigmoid", "σ(reward)", False), ("pref_acc", "pref-acc", True), ("tokens", "tokens", False),
    ("truncated", "truncated", True), ("distinct_1", "distinct-1", False), ("distinct_2", "distinct-2", False),
]
PRIMARY = ("accuracy", "embed_sim", "win_rate", "pref_acc")
OBJECTIVE_ORDER = ("base", "sft", "dpo", "ipo", "sc", "sr-dpo", "sr-ipo", "selm", "d2o")
# Training-config keys that do not make a different method: grouping ignores them.
NOT_METHOD = {"seed", "name", "run", "out", "overwrite", "debug", "verbose", "threads", "shard_index", "num_shards",
              "output_dir", "pairs", "ref_logps"}
LABELS = {key: label for key, label, _ in METRICS}
PCT = {key for key, _, pct in METRICS if pct}


@dataclass
class Model:
    """One eval folder: its summary, training config and label parts."""

    name: str
    path: Path
    summary: dict[str, Any]

    @property
    def train(self) -> dict[str, Any]:
        return self.summary.get("train_config") or {}

    @property
    def objective(self) -> str:
        return str(self.train.get("objective") or "base")

    @property
    def k(self) -> int | None:
        k = self.train.get("num_negatives")
        return int(k) if isinstance(k, int | float) and self.objective not in ("base", "sft") else None

    @property
    def beta(self) -> float | None:
        b = self.train.get("beta")
        return float(b) if isinstance(b, int | float) and self.objective not in ("base", "sft") else None

    @cached_property
    def train_manifest(self) -> dict[str, Any]:
        """The trained model folder's manifest ({} for a base model, or one that cannot be read)."""
        folder = self.summary.get("model_path")
        try:
            manifest = store.read_manifest(Path(folder)) if folder and Path(folder).is_dir() else None
        except (UsageError, OSError):  # a damaged model manifest only loses the grouping detail
            manifest = None
        return manifest or {}

    @property
    def train_inputs(self) -> dict[str, Any]:
        """What the model was trained on ({"pairs": fingerprint}), from its folder's manifest: the same objective on
        other data (e.g. a SPIN-like baseline's random negatives) is another method, not another seed."""
        return dict(self.train_manifest.get("inputs") or {})

    def method(self, *, ignore: tuple[str, ...] = ()) -> list[Any]:
        """What defines the training method: its options (not seeds, paths or runtime flags) and its data."""
        return [{k: v for k, v in self.train.items() if k not in NOT_METHOD and k not in ignore}, self.train_inputs]

    def group_key(self) -> str:
        gen = {k: v for k, v in (self.summary.get("generation") or {}).items() if k != "seed"}
        return json.dumps([*self.method(), gen, self.summary.get("prompts")], sort_keys=True, default=str)

    def metric(self, key: str) -> dict[str, Any] | None:
        m = self.summary.get("overall", {}).get(key)
        return m if m and m.get("mean") is not None else None


@dataclass
class Group:
    """Models whose training config differs only by the seed."""

    models: list[Model]
    label: str = ""

    @property
    def first(self) -> Model:
        return self.models[0]

    def sort_key(self) -> tuple:
        m = self.first
        obj = OBJECTIVE_ORDER.index(m.objective) if m.objective in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        greedy = bool((m.summary.get("generation") or {}).get("greedy"))
        return (obj, m.objective, m.k or 0, m.beta or 0.0, not greedy, m.name)

    def value(self, key: str) -> dict[str, Any] | None:
        """{mean, lo, hi, se, seeds: [...]}: one model's bootstrap interval, or mean ± s.e. over seeds."""
        values = [m.metric(key) for m in self.models]
        values = [v for v in values if v]
        if not values:
            return None
        if len(values) == 1:
            return {**values[0], "se": None, "seeds": [values[0]["mean"]]}
        ms = stats.mean_se([v["mean"] for v in values])
        return {"mean": ms["mean"], "lo": ms["mean"] - ms["se"], "hi": ms["mean"] + ms["se"], "se": ms["se"],
                "seeds": [v["mean"] for v in values]}


def _base_label(m: Model) -> str:
    if m.objective == "base":
        return f"base ({m.summary.get('model') or m.name})"
    parts = [m.objective]
    if m.k is not None:
        parts.append(f"K={m.k}")
    if m.beta is not None:
        parts.append(f"β={m.beta:g}")
    return " ".join(parts)


def load_models(run: Path) -> list[Model]:
    root = run / "eval"
    models = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        f = d / "summary.json"
        if d.is_dir() and not f.is_file():
            console.print(f"report: skipping {d} (no summary.json: its eval did not finish; re-run it to resume)")
        if f.is_file():
            try:
                models.append(Model(d.name, d, json.loads(f.read_text())))
            except json.JSONDecodeError as e:
                raise UsageError(f"{f}: unreadable summary ({e}); re-run `eval` for it") from e
    return models


def group_models(models: list[Model]) -> list[Group]:
    by_key: dict[str, list[Model]] = {}
    for m in models:
        by_key.setdefault(m.group_key(), []).append(m)
    groups = sorted((Group(sorted(ms, key=lambda m: (m.train.get("seed") or 0, m.name))) for ms in by_key.values()),
                    key=Group.sort_key)
    labels = [_base_label(g.first) for g in groups]
    for g, label in zip(groups, labels, strict=True):
        if labels.count(label) == 1:
            g.label = label
            continue
        # Two groups with the same objective/K/β: told apart by decoding if that differs, else by folder names
        # (they differ elsewhere in the training config: learning rate, λ, …).
        same = [o for o, lab in zip(groups, labels, strict=True) if lab == label]
        if len({_decoding(o.first) for o in same}) == len(same):
            g.label = f"{label}, {_decoding(g.first)}"
        else:
            g.label = f"{label} [{', '.join(m.name for m in g.models)}]"
    return groups


def _decoding(m: Model) -> str:
    gen = m.summary.get("generation") or {}
    if gen.get("greedy"):
        return "greedy"
    return f"T={gen.get('temperature')}, n={m.summary.get('num_samples')}"


# ----------------------------------------------------------------------------------------------- formatting

def _style(key: str) -> dict[str, Any]:
    """How a metric is shown: rates in percent with 1 decimal, tokens with 1, the rest with 3."""
    return {"scale": 100.0 if key in PCT else 1.0, "digits": 1 if key in PCT or key == "tokens" else 3}


def fmt(v: dict[str, Any] | None, key: str) -> str:
    """report.md cell: "33.3% [8.3, 58.3]", or "16.7% ± 2.1 (seeds: 14.6, 18.8)" over seeds."""
    return stats.fmt_interval(v, **_style(key), unit="%" if key in PCT else "")


def _columns(groups: list[Group]) -> list[str]:
    return [key for key, _, _ in METRICS if any(g.value(key) for g in groups)]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 9})
    return plt


def _yerr(v: dict[str, Any], scale: float) -> tuple[float, list[list[float]]]:
    y = scale * v["mean"]
    return y, [[y - scale * v["lo"]], [scale * v["hi"] - y]]


def _ylabel(key: str) -> str:
    return f"{LABELS[key]} (%)" if key in PCT else LABELS[key]


def plot_vs_k(groups: list[Group], out: Path) -> Path | None:
    """Metric against K for the sc models (log2 x axis), error bars; other models as dashed reference lines."""
    sc = [g for g in groups if g.first.objective == "sc" and g.first.k is not None]
    keys = [k for k in PRIMARY if any(g.value(k) for g in sc)]
    if not sc or not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    others = [g for g in groups if g.first.objective != "sc"]
    # One line per method that differs only by K (same β, data, SFT term, ...); a method with one K is a point.
    series: dict[str, list[Group]] = {}
    for g in sc:
        key = json.dumps(g.first.method(ignore=("num_negatives",)), sort_keys=True, default=str)
        series.setdefault(key, []).append(g)
    lines = sorted(series.values(), key=lambda gs: (-len(gs), gs[0].first.beta or 0.0))
    for ax, key in zip(axes[0], keys, strict=True):
        scale = 100.0 if key in PCT else 1.0
        for i, members in enumerate(lines):
            line = sorted((g for g in members if g.value(key)), key=lambda g: g.first.k)
            if not line:
                continue
            b = line[0].first.beta
            label = (f"sc β={b:g}" if b is not None else "sc") if len(members) > 1 else line[0].label
            xs = [g.first.k for g in line]
            ys, errs = zip(*(_yerr(g.value(key), scale) for g in line), strict=True)
            err = [[e[0][0] for e in errs], [e[1][0] for e in errs]]
            ax.errorbar(xs, ys, yerr=err, marker="o" if len(members) > 1 else "D", capsize=3, label=label,
                        color=f"C{i}", linestyle="-" if len(members) > 1 else "none")
            for g in line:
                seeds = g.value(key)["seeds"]
                if len(seeds) > 1:  # per-seed values, spread a little sideways so they do not hide the bar
                    xs_seed = g.first.k * 2 ** np.linspace(-0.08, 0.08, len(seeds))
                    first = "seeds" not in ax.get_legend_handles_labels()[1]
                    ax.scatter(xs_seed, [scale * s for s in seeds], s=14, facecolors="white", edgecolors="grey",
                               zorder=3, label="seeds" if first else None)
        for i, g in enumerate(others):
            v = g.value(key)
            if v:
                ax.axhline(scale * v["mean"], linestyle="--", linewidth=1, color=f"C{(i + len(lines)) % 10}",
                           label=g.label)
        ks = sorted({g.first.k for g in sc})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("K (negatives per prompt)")
        ax.set_ylabel(_ylabel(key))
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Self-Contrast: metric against K (error bars: 95% bootstrap interval over prompts, or ± s.e. "
                 "over seeds; circles: seeds)", fontsize=9)
    fig.tight_layout()
    path = out / "metric_vs_k.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_per_model(groups: list[Group], out: Path) -> Path | None:
    """One panel per primary metric: a bar per model (group), error bars, per-seed values as dots."""
    keys = [k for k in PRIMARY if any(g.value(k) for g in groups)]
    if not keys:
        return None
    plt = _plt()
    width = max(6.5, 0.8 * len(groups) + 1.5)
    fig, axes = plt.subplots(len(keys), 1, figsize=(width, 2.8 * len(keys)), squeeze=False)
    colours = {obj: f"C{i}" for i, obj in enumerate(dict.fromkeys(g.first.objective for g in groups))}
    for ax, key in zip(axes[:, 0], keys, strict=True):
        scale = 100.0 if key in PCT else 1.0
        for i, g in enumerate(groups):
            v = g.value(key)
            if not v:
                continue
            y, err = _yerr(v, scale)
            ax.bar(i, y, color=colours[g.first.objective], alpha=0.8)
            ax.errorbar(i, y, yerr=err, color="black", capsize=4, linewidth=1)
            ax.annotate(f"{y:.1f}" if key in PCT else f"{y:.3f}", (i, y + err[1][0]), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=7)
            if len(v["seeds"]) > 1:
                ax.scatter(i + np.linspace(-0.15, 0.15, len(v["seeds"])), [scale * s for s in v["seeds"]], s=14,
                           facecolors="white", edgecolors="black", zorder=3)
        ax.set_xticks(range(len(groups)), [g.label for g in groups], rotation=20, ha="right")
        ax.set_ylabel(_ylabel(key))
        if key in PCT:
            ax.set_ylim(0, 100)
    fig.suptitle("Metrics per model, ordered by objective, K, β\n"
                 "error bars: 95% bootstrap interval over prompts, or ± s.e. over seeds (circles: seeds)", fontsize=9)
    fig.tight_layout()
    path = out / "per_model.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lengths(groups: list[Group], tokens: dict[str, np.ndarray], out: Path) -> Path | None:
    """Box plot of answer length (tokens) per model; the mean as a diamond, the truncation rate in the label."""
    data, labels = [], []
    for g in groups:
        values = np.concatenate([tokens[m.name] for m in g.models if m.name in tokens] or [np.zeros(0)])
        if values.size:
            trunc = g.value("truncated")
            data.append(values)
            labels.append(f"{g.label}\n(truncated {100 * trunc['mean']:.0f}%)" if trunc else g.label)
    if not data:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 0.6 * len(data) + 1.5))
    ax.boxplot(data, orientation="horizontal", showmeans=True, tick_labels=labels,
               meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4})
    ax.invert_yaxis()  # the first model on top, as in the table
    ax.set_xlabel("answer length (tokens, EOS included)")
    fig.suptitle("Answer length per model (box: quartiles, line: median, diamond: mean)", fontsize=9)
    fig.tight_layout()
    path = out / "lengths.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _training_log(m: Model) -> list[dict[str, Any]]:
    """The model's `metrics.jsonl` (one line per optimizer step), or [] when there is none (base models)."""
    folder = m.summary.get("model_path")
    f = Path(folder) / "metrics.jsonl" if folder else None
    if f is None or not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed run
            continue
    return [r for r in rows if "step" in r]


def plot_displacement(models: list[Model], out: Path) -> Path | None:
    """Per step: the chosen's log-ratio per token (preference models, with train's warning threshold) and the
    chosen's summed log-prob (every trained model). A falling chosen is likelihood displacement (arXiv 2410.08847)."""
    logs: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for m in sorted(models, key=lambda m: (m.name.startswith("val-"), m.name)):  # one line per model folder
        folder = str(m.summary.get("model_path"))
        rows = _training_log(m)
        if folder not in seen and any("logps/chosen" in r for r in rows):
            seen.add(folder)
            logs[m.name] = rows
    if not logs:
        return None
    from negalign.losses import DISPLACEMENT_THRESHOLD, DISPLACEMENT_WINDOW, displacement_means

    def smooth(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
        """The moving average train's warning uses (`losses.displacement_means`), at the step that ends each window."""
        steps, values = zip(*points, strict=True)
        means = displacement_means(list(values))
        return list(steps)[len(steps) - len(means):], means

    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    colors = plt.get_cmap("tab20").colors
    for i, (name, rows) in enumerate(sorted(logs.items())):
        color = colors[i % len(colors)]
        ratio = [(r["step"], r["logratio/chosen_per_token"]) for r in rows if "logratio/chosen_per_token" in r]
        if ratio:
            left.plot(*smooth(ratio), label=name, lw=1, color=color)
        lp = [(r["step"], r["logps/chosen"]) for r in rows if "logps/chosen" in r]
        right.plot(*smooth(lp), label=name, lw=1, ls="-" if ratio else "--", color=color)
    left.axhline(DISPLACEMENT_THRESHOLD, color="red", lw=1, ls=":", label=f"warning ({DISPLACEMENT_THRESHOLD:g})")
    left.axhline(0.0, color="black", lw=0.6)
    left.set_xlabel("optimizer step")
    left.set_ylabel("chosen log-ratio to the reference (nats/token)")
    right.set_xlabel("optimizer step")
    right.set_ylabel("chosen summed log-prob (policy; dashed: no reference)")
    handles, labels = right.get_legend_handles_labels()
    extra = [(h, lab) for h, lab in zip(*left.get_legend_handles_labels(), strict=True) if lab.startswith("warning")]
    fig.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle("Likelihood displacement: the chosen answer during training (moving average over "
                 f"{DISPLACEMENT_WINDOW:.0%} of each run's steps, as train's warning)", fontsize=9)
    fig.tight_layout()
    path = out / "displacement.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- paired

def _scores(m: Model) -> pa.Table:
    return open_stage(m.path / "scores", "eval").read(["prompt_id", "sample_idx", "correct", "embed_sim", "reward"])


def _per_prompt(table: pa.Table) -> dict[str, dict[str, float]]:
    """{prompt_id: {metric: mean over samples, 'first_correct': sample 0's outcome}}."""
    out: dict[str, dict[str, list[float]]] = {}
    first: dict[str, bool | None] = {}
    for r in table.to_pylist():
        d = out.setdefault(r["prompt_id"], {"correct": [], "embed_sim": [], "reward": []})
        for k in d:
            if r[k] is not None:
                d[k].append(float(r[k]))
        if r["sample_idx"] == 0:
            first[r["prompt_id"]] = r["correct"]
    return {p: {**{k: (float(np.mean(v)) if v else math.nan) for k, v in d.items()},
                "first_correct": first.get(p)} for p, d in out.items()}


def paired(a: Model, b: Model, cfg: ReportConfig) -> dict[str, Any]:
    """Win/tie/loss, mean difference A − B with a paired bootstrap interval, McNemar's exact p for the checker."""
    pa_, pb = _per_prompt(_scores(a)), _per_prompt(_scores(b))
    shared = sorted(set(pa_) & set(pb))
    if not shared:
        raise UsageError(f"--against {a.name} {b.name}: the two evals share no prompts")
    result: dict[str, Any] = {"a": a.name, "b": b.name, "prompts": len(shared), "only_a": len(set(pa_) - set(pb)),
                              "only_b": len(set(pb) - set(pa_)), "metrics": {}}
    for key, label, tol in (("correct", "checker accuracy", 0.0), ("embed_sim", "embed-sim", 1e-6),
                            ("reward", "reward", 1e-6)):
        x = np.array([pa_[p][key] for p in shared])
        y = np.array([pb[p][key] for p in shared])
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            continue
        entry = {"label": label, **stats.win_tie_loss(x[ok], y[ok], tol),
                 "diff": stats.paired_bootstrap_ci(x[ok], y[ok], n_boot=cfg.bootstrap, seed=cfg.seed),
                 "a_mean": float(x[ok].mean()), "b_mean": float(y[ok].mean())}
        if key == "correct":
            fa = [pa_[p]["first_correct"] for p in shared]
            fb = [pb[p]["first_correct"] for p in shared]
            both = [(u, v) for u, v in zip(fa, fb, strict=True) if u is not None and v is not None]
            if both:
                entry["mcnemar"] = stats.mcnemar_exact([u for u, _ in both], [v for _, v in both])
        result["metrics"][key] = entry
    return result


def pairs_table(comparisons: list[dict[str, Any]]) -> str:
    """One row per comparison: checker accuracy A − B with its paired interval and McNemar's p."""
    rows = []
    for c in comparisons:
        e = c["metrics"].get("correct")
        if e is None:
            continue
        rows.append([f"{c['a']} vs {c['b']}", str(c["prompts"]), f"{100 * e['a_mean']:.1f}%",
                     f"{100 * e['b_mean']:.1f}%", _diff(e["diff"], "correct"),
                     f"{e['win']} / {e['tie']} / {e['loss']}",
                     f"{e['mcnemar']['p']:.3g}" if "mcnemar" in e else "–"])
    return _md_table(["A vs B", "prompts", "A", "B", "A − B (paired 95% CI)", "A better / tie / B better",
                      "McNemar p"], rows)


def _paired_md(res: dict[str, Any]) -> str:
    a, b = res["a"], res["b"]
    rows = []
    for key, e in res["metrics"].items():
        p = f"{e['mcnemar']['p']:.3g}" if "mcnemar" in e else "–"
        mean_a = f"{100 * e['a_mean']:.1f}%" if key == "correct" else f"{e['a_mean']:.3f}"
        mean_b = f"{100 * e['b_mean']:.1f}%" if key == "correct" else f"{e['b_mean']:.3f}"
        rows.append([e["label"], mean_a, mean_b, str(e["win"]), str(e["tie"]), str(e["loss"]),
                     _diff(e["diff"], key), p])
    head = ["metric", f"{a}", f"{b}", f"{a} better", "tie", f"{b} better", f"{a} − {b} (paired 95% CI)",
            "McNemar p"]
    note = (f"{res['prompts']} shared prompts (per prompt: the mean over its samples)"
            + (f"; {res['only_a']} only in {a}, {res['only_b']} only in {b} (left out)"
               if res["only_a"] or res["only_b"] else "")
            + ". McNemar's exact test uses each prompt's first answer (right/wrong) and counts only the prompts "
              "where the two models disagree.")
    return _md_table(head, rows) + "\n\n" + note


# ----------------------------------------------------------------------------------------------- run

def compare_pair(item: str) -> tuple[str, str]:
    """`--compare A:B` -> (A, B)."""
    a, sep, b = str(item).partition(":")
    if not sep or not a.strip() or not b.strip():
        raise UsageError(f"--compare {item}: expected A:B, two eval names")
    return a.strip(), b.strip()


def run(cfg: ReportConfig) -> Path:
    run_dir = Path(cfg.run)
    models = load_models(run_dir)
    if not models:
        raise UsageError(f"{run_dir / 'eval'}: no evaluated models (no eval/NAME/summary.json); run `eval` first")
    against = [n for item in (cfg.against or []) for n in str(item).replace(",", " ").split()]
    if against and len(against) != 2:
        raise UsageError(f"--against takes two eval names (--against A --against B), got {len(against)}")
    pairs = [(against[0], against[1])] if against else []
    pairs += [compare_pair(item) for item in cfg.compare or []]
    by_name = {m.name: m for m in models}
    for name in {n for pair in pairs for n in pair}:
        if name not in by_name:
            raise UsageError(f"--against/--compare: no eval named {name!r} (have: {', '.join(sorted(by_name))})")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_models(models)
    tokens = {}
    for m in models:
        if read_manifest(m.path / "scores") is not None:
            tokens[m.name] = open_stage(m.path / "scores", "eval").read(["num_tokens"]).column(
                "num_tokens").to_numpy(zero_copy_only=False)
    plots = {"metric_vs_k": plot_vs_k(groups, out), "per_model": plot_per_model(groups, out),
             "lengths": plot_lengths(groups, tokens, out), "displacement": plot_displacement(models, out)}
    comparisons = [paired(by_name[a], by_name[b], cfg) for a, b in pairs]
    md = _markdown(groups, plots, comparisons, run_dir)
    atomic_write_text(out / "report.md", md)
    _print(groups, comparisons)
    console.print(f"report: {len(models)} evals in {len(groups)} groups -> {out / 'report.md'} "
                  f"({', '.join(p.name for p in plots.values() if p)})")
    return out / "report.md"


def _markdown(groups: list[Group], plots: dict[str, Path | None], comparisons: list[dict[str, Any]],
              run_dir: Path) -> str:
    cols = _columns(groups)
    first = groups[0].first.summary
    boot = first.get("bootstrap", {})
    lines = [f"# Report: {run_dir}", "",
             f"{sum(len(g.models) for g in groups)} evaluated models in {len(groups)} groups, ordered by objective, "
             f"K, β. A single model shows its mean and 95% bootstrap interval over prompts "
             f"({boot.get('n_boot', '?')} resamples, seed {boot.get('seed', '?')}); models that differ only by seed "
             "show mean ± standard error over seeds, with the per-seed values.", "",
             "## All models", ""]
    header = ["model", "evals", "prompts", *[LABELS[k] for k in cols]]
    rows = [[g.label, ", ".join(m.name for m in g.models), str(g.first.summary.get("overall", {}).get("num_prompts")),
             *[fmt(g.value(k), k) for k in cols]] for g in groups]
    lines += [_md_table(header, rows), ""]
    fams = sorted({f for g in groups for m in g.models for f in m.summary.get("by_task", {})})
    if fams:
        key = next((k for k in PRIMARY if any(g.value(k) for g in groups)), "accuracy")
        lines += [f"## {LABELS[key]} per task family", ""]
        frows = []
        for g in groups:
            cells = []
            for fam in fams:
                vals = [m.summary.get("by_task", {}).get(fam, {}).get(key) for m in g.models]
                vals = [v for v in vals if v and v.get("mean") is not None]
                if len(vals) == 1:
                    cells.append(fmt({**vals[0], "se": None}, key))
                elif vals:
                    ms = stats.mean_se([v["mean"] for v in vals])
                    cells.append(fmt({**ms, "seeds": [v["mean"] for v in vals]}, key))
                else:
                    cells.append("–")
            frows.append([g.label, *cells])
        lines += [_md_table(["model", *fams], frows), ""]
    if len(comparisons) > 1:
        lines += ["## Paired comparisons", "", pairs_table(comparisons), ""]
    for comparison in comparisons:
        lines += [f"## Paired: {comparison['a']} vs {comparison['b']}", "", _paired_md(comparison), ""]
    lines += ["## Plots", ""]
    captions = {"metric_vs_k": "Metric against K for the Self-Contrast (`sc`) models; dashed lines: the other models.",
                "per_model": "Each metric per model.",
                "lengths": "Answer length per model. DPO-family training is known to lengthen answers; "
                           "compare with the base/SFT rows.",
                "displacement": "The chosen answer during training: its log-ratio to the reference per token "
                                "(left; below the dotted line `train` warns of likelihood displacement) and its "
                                "summed log-prob (right)."}
    for key, caption in captions.items():
        if plots.get(key):
            lines += [f"{caption}", "", f"![{key}]({plots[key].name})", ""]
        elif key == "metric_vs_k":
            lines += ["(No `sc` models with a K among the evals: no plot of the metric against K.)", ""]
    lines += ["## Models", ""]
    mrows = []
    for g in groups:
        for m in g.models:
            t = m.train
            gen = m.summary.get("generation") or {}
            mrows.append([m.name, g.label, str(t.get("seed", "–")), str(m.summary.get("model_path", "–")),
                          "greedy" if gen.get("greedy") else f"T={gen.get('temperature')}",
                          str(gen.get("max_tokens")), str(m.summary.get("num_samples"))])
    lines += [_md_table(["eval", "group", "train seed", "model folder", "decoding", "max tokens", "samples"], mrows),
              ""]
    return "\n".join(lines)


def _short(v: dict[str, Any] | None, key: str) -> str:
    """Terminal cell: "33.3 [8.3, 58.3]" (percent points for rates) or "16.7 ±2.1 (n=2)" over seeds."""
    return stats.fmt_interval(v, **_style(key), seeds="count")


def _print(groups: list[Group], comparisons: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    cols = [k for k in _columns(groups) if k not in ("distinct_1", "distinct_2")]
    table = Table(title="report: mean \\[95% bootstrap interval], or mean ±s.e. over n seeds; rates in %; "
                        "distinct-n and per-seed values in report.md", title_justify="left")
    table.add_column("model", overflow="fold")
    for k in cols:
        table.add_column(LABELS[k] + (" %" if k in PCT else ""), overflow="fold")
    for g in groups:
        table.add_row(escape(g.label), *[_short(g.value(k), k) for k in cols])
    console.print(table)
    for comparison in comparisons:
        t2 = Table(title=escape(f"paired: A = {comparison['a']} vs B = {comparison['b']} "
                                f"({comparison['prompts']} prompts)"),
                   title_justify="left")
        for c in ("metric", "A better", "tie", "B better", "A − B [paired 95% CI]", "McNemar p"):
            t2.add_column(escape(c))
        for key, e in comparison["metrics"].items():
            t2.add_row(e["label"], str(e["win"]), str(e["tie"]), str(e["loss"]), _diff(e["diff"], key),
                       f"{e['mcnemar']['p']:.3g}" if "mcnemar" in e else "–")
        console.print(t2)


def _diff(d: dict[str, Any], key: str) -> str:
    """A signed difference with its interval: points for the checker, 3 decimals otherwise."""
    if key == "correct":
        return stats.fmt_interval(d, scale=100.0, digits=1, unit=" pts", sign="+")
    return stats.fmt_interval(d, sign="+")
