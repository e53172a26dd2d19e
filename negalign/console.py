"""Terminal output: one rich console (stderr) and one progress-bar factory, so every stage looks the same."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, soft_wrap=True, highlight=False)
if not console.is_terminal:  # logs and pipes: wide enough for the summary tables
    console.width = max(console.width, 120)


class RateColumn(ProgressColumn):
    """Throughput of a custom counter stored in task.fields (e.g. tokens) per elapsed second."""

    def __init__(self, field: str, unit: str) -> None:
        super().__init__()
        self.field, self.unit = field, unit

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        value = task.fields.get(self.field, 0)
        rate = value / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} {self.unit}", style="cyan")


def progress(rate_field: str | None = None, rate_unit: str = "tok/s") -> Progress:
    """A progress bar with done/total, percent, elapsed, ETA and optionally a rate of `rate_field` per second."""
    columns: list[ProgressColumn | str] = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
    ]
    if rate_field:
        columns.append(RateColumn(rate_field, rate_unit))
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    # 2 refreshes a second, not rich's 10: the bar's thread otherwise takes ~1% of a core from the engine that
    # it reports on (measured beside vLLM's engine core on 2 cores).
    return Progress(*columns, console=console, transient=False, refresh_per_second=2)
