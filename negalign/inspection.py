"""`negalign inspect`: what a run directory (or one stage folder) holds, readable in a terminal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from rich.table import Table

from negalign.console import console
from negalign.errors import UsageError
from negalign.store import (
    LEGACY_MANIFEST,
    MANIFEST,
    StageInput,
    damaged_shards,
    manifest_file,
    open_stage,
    read_manifest,
    stale_reason,
)


def histogram(values: np.ndarray, bins: int = 10, width: int = 40, lo: float | None = None,
              hi: float | None = None) -> list[str]:
    """Text histogram lines: `[lo, hi)  ####  count`."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return ["(no values)"]
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)
    return [f"[{edges[i]:+.2f}, {edges[i + 1]:+.2f})  {'█' * round(width * c / top):<{width}}  {c}"
            for i, c in enumerate(counts)]


def _shards_text(m: dict) -> str:
    done = sum(1 for s in m["shards"].values() if s["status"] == "complete")
    return f"{done}/{m['num_shards'] if m.get('num_shards') is not None else '?'}"


def check(folder: Path, m: dict) -> str:
    """`ok`, or what is wrong with a stage output: damaged or missing shards (every byte is re-hashed), or an
    upstream output that changed since it was built."""
    bad = damaged_shards(folder, m)
    if bad:
        return f"damaged: {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}"
    if m["status"] == "complete" and (why := stale_reason(StageInput(folder, m))):
        return f"stale: {why}"
    return "ok"


def _overview(run: Path) -> int:
    """Print one row per stage folder of the run; return how many are damaged, stale or broken."""
    table = Table(title=f"run {run}", title_justify="left")
    for col in ("folder", "stage", "status", "shards", "rows", "fingerprint", "check"):
        table.add_column(col)
    found, problems = False, 0
    folders = sorted({p.parent for name in (MANIFEST, LEGACY_MANIFEST) for p in run.rglob(name)
                      if not any(part.startswith(".") for part in p.relative_to(run).parts)})  # no staging folders
    for folder in folders:
        found = True
        try:
            m = read_manifest(folder)
        except UsageError:
            table.add_row(str(folder.relative_to(run)), "?", "?", "?", "?", "-", "broken manifest")
            problems += 1
            continue
        assert m is not None
        rows = sum(s["rows"] for s in m["shards"].values())
        verdict = check(folder, m)
        problems += verdict != "ok"
        table.add_row(str(folder.relative_to(run)), m["stage"], m["status"], _shards_text(m), f"{rows:,}",
                      m.get("fingerprint", "-"), verdict)
    if not found:
        raise UsageError(f"{run}: no stage outputs here (no {MANIFEST})")
    console.print(table)
    return problems


def _stage_details(stage: StageInput, examples: int) -> None:
    m = stage.manifest
    console.print(f"[bold]{stage.path}[/bold]: stage {m['stage']}, {stage.num_rows:,} rows in "
                  f"{len(m['shards'])} shards, status {m['status']}, config {m['config_fingerprint']}")
    console.print(f"config: {m['config']}")
    if m.get("summary"):
        console.print(f"summary: {m['summary']}")
    table = stage.read()
    if m["stage"] == "filter" and table.num_rows:
        from negalign.filter import print_summary, summarise

        summary = summarise(table)
        for key in ("correct_by_family", "prompts_m_by_unique"):  # need the prompts / N: the manifest has them
            if (m.get("summary") or {}).get(key) is not None:
                summary[key] = m["summary"][key]
        print_summary(summary)
        sims = table.column("sim_to_target").to_numpy(zero_copy_only=False).astype(float)
        kept = table.column("kept").to_numpy(zero_copy_only=False)
        lo = min(-0.2, float(np.nanmin(sims))) if np.isfinite(sims).any() else -0.2
        for label, mask in (("kept", kept), ("dropped", ~kept)):
            console.print(f"[bold]similarity histogram ({label}, {int(mask.sum())} rows)[/bold]")
            for line in histogram(sims[mask], lo=lo, hi=1.0):
                console.print("  " + line)
    if m["stage"] == "sample" and table.num_rows:
        reasons = pc.value_counts(table.column("finish_reason")).to_pylist()
        tokens = table.column("num_tokens").to_numpy()
        empty = int(pc.sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table.column("text"))), 0)).as_py() or 0)
        console.print(f"finish reasons: {({r['values']: r['counts'] for r in reasons})}; tokens per sample: "
                      f"mean {tokens.mean():.1f}, max {tokens.max()}; empty samples: {empty}")
    if examples and table.num_rows:
        console.print(f"[bold]first {min(examples, table.num_rows)} rows[/bold]")
        skip = {"embedding"}
        for row in table.slice(0, examples).to_pylist():
            console.print({k: (v[:200] + "…" if isinstance(v, str) and len(v) > 200 else v)
                           for k, v in row.items() if k not in skip})


def show(path: Path, examples: int = 3) -> int:
    """Show a run or one stage folder; return how many folders are damaged, stale or broken (unfinished is not a
    problem: it may be running)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: not found")
    if manifest_file(path) is not None:
        m = read_manifest(path)
        assert m is not None
        problem = check(path, m)
        if problem != "ok":
            console.print(f"[red]{path}: {problem}[/red]")
        if m["status"] != "complete":
            console.print(f"{path}: stage {m['stage']} is not finished ({_shards_text(m)} shards done)")
        elif not problem.startswith("damaged"):
            _stage_details(open_stage(path, check_lineage=False), examples)
        return int(problem != "ok")
    return _overview(path)
