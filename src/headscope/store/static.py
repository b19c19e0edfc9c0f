"""Export a run with the browser app as a static site: any static web host can serve it."""

from __future__ import annotations

import shutil
from pathlib import Path

from headscope.errors import AlreadyExists
from headscope.files import atomic_dir, write_json
from headscope.store.run import open_run

APP_DIR = Path(__file__).resolve().parents[1] / "app"


def export_static(run_dir: Path | str, out: Path | str) -> Path:
    """Copy the app to ``out/`` and the run to ``out/run/``. Live views then say they need a
    server; everything precomputed (attributions included) works from the files alone."""
    run = open_run(run_dir)  # refuses incomplete runs
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlreadyExists(f"{out} exists and is not an empty folder; choose another path")
    with atomic_dir(out) as tmp:
        shutil.copytree(
            APP_DIR, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.py"), dirs_exist_ok=True
        )
        shutil.copytree(run.path, tmp / "run", ignore=shutil.ignore_patterns("checkpoint", ".*"))
        # the copy is always called "run": keep the run's own name for the app's header
        write_json(tmp / "run" / "manifest.json", {**run.manifest, "name": run.name}, indent=2)
    return out
