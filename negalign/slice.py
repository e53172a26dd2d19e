"""`slice`: prompts[start:stop] of a prompts folder, in a seeded order, as a prompts artifact.

SELM's fresh prompts per round (`iterations:` in a pipeline), or any part of a prompt set (a test split made from
the training file). Order: prompts sorted by fingerprint(seed, prompt_id), so a slice does not depend on the shard
layout; the rows keep their original order inside the slice.
"""

from __future__ import annotations

from negalign import store
from negalign.config import SliceConfig
from negalign.console import console
from negalign.errors import UsageError
from negalign.stages import output_dir, stage_input


def run(cfg: SliceConfig) -> None:
    """prompts[start:stop] in a seeded order: SELM's fresh prompts per round, or a part of a prompt set."""
    src = store.open_stage(*stage_input(cfg, "prompts"))
    out_dir = output_dir(cfg)
    table = src.read()
    ids = table.column("prompt_id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: store.fingerprint([cfg.seed, ids[i]]))
    stop = cfg.start + cfg.count if cfg.count is not None else cfg.stop
    picked = order[cfg.start:stop]
    if not picked:
        raise UsageError(f"slice [{cfg.start}:{stop}] of {src.path} is empty ({len(ids)} prompts)")
    part = table.take(sorted(picked))
    out = store.StageOutput.open(out_dir, "prompts", {"start": cfg.start, "stop": stop, "seed": cfg.seed},
                                 {"prompts": src.fingerprint}, overwrite=cfg.overwrite)
    if not out.done(0):
        out.write_shard(0, part)
    out.finish(1, summary={"prompts": part.num_rows, "with_target": sum(
        t is not None for t in part.column("target").to_pylist())})
    console.print(f"slice: {part.num_rows} of {len(ids)} prompts -> {out_dir}")
