"""Precomputed QK/OV attributions for the strongest edges of chosen heads (static-first).

Written as ``attributions/{head}/{sequence}_{query}_{key}_{qk|ov}.json`` in the same JSON as the
live API, and listed under ``"attributions"`` in the manifest so the browser asks only for files
that exist. A static copy of the run then shows these attributions with no server.
"""

from __future__ import annotations

from pathlib import Path

from headscope.analysis.attribution import ov_attribution, qk_attribution
from headscope.analysis.session import Session
from headscope.files import read_json, write_json
from headscope.store.run import open_run


def strongest_edge(example: dict) -> tuple[int, int]:
    """The (query, key) pair with the largest weight in an example's sparse pattern, key 0 and
    the diagonal excluded when anything else is there."""
    best = max(
        (e for e in example["sparse"] if e[1] != 0 and e[0] != e[1]),
        key=lambda e: e[2],
        default=max(example["sparse"], key=lambda e: e[2]),
    )
    return int(best[0]), int(best[1])


def precompute_attributions(
    run_dir: Path, session: Session, heads: list[str], per_head: int = 1
) -> list[str]:
    """Attribute the strongest edge of each head's top ``per_head`` examples; returns the
    relative file names and records them in the manifest."""
    run = open_run(run_dir)
    written: list[str] = []
    for head in heads:
        examples = run.head(head)["examples"][:per_head]
        for ex in examples:
            q, k = strongest_edge(ex)
            ids = ex["tokens"]
            for kind, fn in (("qk", qk_attribution), ("ov", ov_attribution)):
                result = fn(session, ids, head, q, k)
                name = f"{head}/{ex['sequence']}_{q}_{k}_{kind}.json"
                record = {**result.model_dump(), "sequence": ex["sequence"]}
                write_json(run_dir / "attributions" / name, record)
                written.append(name)
    manifest = read_json(run_dir / "manifest.json")
    manifest["attributions"] = sorted(set(manifest.get("attributions", [])) | set(written))
    write_json(run_dir / "manifest.json", manifest, indent=2)
    return written
