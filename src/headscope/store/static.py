"""Export a run with the browser app as a static site: any static web host can serve it."""

from __future__ import annotations

import shutil
from pathlib import Path

from headscope.store.run import open_run

APP_DIR = Path(__file__).resolve().parents[1] / "app"


def export_static(run_dir: Path | str, out: Path | str) -> Path:
    """Copy the app to ``out/`` and the run to ``out/run/``. Live views then say they need a
    server; everything precomputed (attributions included) works from the files alone."""
    run = open_run(run_dir)  # refuses incomplete runs
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(APP_DIR, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    shutil.copytree(run.path, tmp / "run", ignore=shutil.ignore_patterns("checkpoint", ".*"))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
