"""``headscope demo``: the whole product on the embedded default model, from nothing.

Builds the default corpus, precomputes the default model on it, precomputes attributions for the
most distinctive heads, trains residual dictionaries for two layers, then serves the run with the
live model (and the dictionaries, for feature-basis attributions) and prints the URL to open.
Every step that takes a while shows a progress bar with an ETA on stderr; a finished step is
reused. One float32 copy of the model serves steps 3 and 4 and then the server.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from headscope.files import atomic_dir, read_json
from headscope.memory import release_freed_memory
from headscope.model.loading import cache_dir

if TYPE_CHECKING:
    from headscope.analysis.session import Session

DEMO_METRICS = (
    "prev_token_score",
    "induction_score",
    "prefix_matching_score",
    "duplicate_token_score",
    "self_attention_score",
)
# Dictionary training's stream (train_sites' defaults, spelled out so the progress bar knows
# how many tokens the forward passes will read).
DICT_STREAM = {"seq_len": 256, "batch_size": 8, "n_eval": 8192}


def default_demo_dir() -> Path:
    return cache_dir() / "runs" / "demo"


def live_session(model: str = "default") -> Callable[[], Session]:
    """A function that loads ``model`` (float32) into a :class:`Session` on its first call and
    returns that same session on every call."""

    @functools.cache
    def load() -> Session:
        from headscope.analysis.session import Session
        from headscope.model import ModelAdapter

        return Session(ModelAdapter.load(model))

    return load


def _complete(out: Path, config: dict) -> bool:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return False
    found = read_json(manifest)
    return found.get("status") == "complete" and found.get("config") == config


def _forward_tokens(rows: int) -> int:
    """Tokens the forward passes read to give ``rows`` activation rows (BOS left out)."""
    per_batch = DICT_STREAM["batch_size"] * (DICT_STREAM["seq_len"] - 1)
    return math.ceil(rows / per_batch) * DICT_STREAM["batch_size"] * DICT_STREAM["seq_len"]


def build_demo(
    out: Path | None = None,
    *,
    sequences: int = 64,
    seq_len: int = 256,
    dict_tokens: int = 100_000,
    label_tokens: int = 30_000,
    log=print,
    session: Callable[[], Session] | None = None,
    model: str = "default",
    data: Path | None = None,
) -> Path:
    """Precompute the demo run (resumes or reuses a finished one); returns its directory.

    The run gets residual dictionaries for two layers (those of its strongest induction and
    previous-token heads) in ``RUN/dictionaries/``, so feature-basis attributions work.
    ``session``: returns the live session steps 3 and 4 use (default: :func:`live_session`).
    ``model`` and ``data`` (default: the default corpus) are for tests."""
    from headscope.data.corpus import ensure_default_corpus
    from headscope.precompute.config import PrecomputeConfig
    from headscope.precompute.runner import run_precompute
    from headscope.progress import bar, counting_tokens
    from headscope.store import open_run

    out = out or default_demo_dir()
    live = session or live_session(model)
    t0 = time.perf_counter()
    corpus = data or ensure_default_corpus()
    log(f"[1/4] default corpus: {corpus}")
    cfg = PrecomputeConfig(
        model=model,
        data=str(corpus),
        sequences=sequences,
        seq_len=seq_len,
        batch_size=4,
        dtype="bf16",
    )
    if _complete(out, cfg.to_dict()):
        log(f"[2/4] reusing the run at {out}")
    else:
        verb = "resuming" if (out / "manifest.json").is_file() else "precomputing"
        log(f"[2/4] {verb} {sequences} sequences x {seq_len} tokens into {out}")
        run_precompute(cfg, out)
    run = open_run(out)
    if not run.manifest.get("attributions"):
        from headscope.precompute.attributions import precompute_attributions

        m = run.metrics
        heads = list(
            dict.fromkeys(name for metric in DEMO_METRICS for name in m.nlargest(2, metric)["name"])
        )
        log(f"[3/4] precomputing attributions for {len(heads)} heads: {', '.join(heads)}")
        with bar(len(heads), "attributions", "head") as done:
            for head in heads:
                precompute_attributions(out, live(), [head])
                done.update()
    else:
        log("[3/4] reusing the run's attributions")
    dict_dir = out / "dictionaries"
    if dict_tokens > 0 and not dict_dir.is_dir():
        from tqdm import tqdm

        from headscope.dictionaries.pipeline import train_dictionaries

        m = run.metrics
        metrics = ("prefix_matching_score", "prev_token_score")
        layers = sorted({int(m.nlargest(1, c)["layer"].iloc[0]) for c in metrics})
        if len(layers) == 1:
            layers.append(max(0, layers[0] - 1))
        log(f"[4/4] training residual dictionaries for layers {layers} on {dict_tokens} tokens")
        adapter = live().adapter
        total = _forward_tokens(dict_tokens + DICT_STREAM["n_eval"])
        total += _forward_tokens(label_tokens) if label_tokens > 0 else 0

        def log_over_bar(msg: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                log(msg)

        with (
            atomic_dir(dict_dir) as tmp,
            bar(total, "dictionaries", "tok") as tokens,
            counting_tokens(adapter, tokens),
        ):
            train_dictionaries(
                adapter,
                corpus,
                "resid",
                sorted(layers),
                out=tmp,
                n_features=2048,
                k=32,
                n_tokens=dict_tokens,
                label_tokens=label_tokens,
                log=log_over_bar,
                **DICT_STREAM,
            )
    elif dict_dir.is_dir():
        log(f"[4/4] reusing the dictionaries in {dict_dir}")
    # Memory the steps freed (training buffers, forward-pass temporaries) goes back to the
    # operating system before the server starts.
    release_freed_memory(collect=True)
    log(f"demo run ready in {time.perf_counter() - t0:.0f} s")
    return out


def demo(
    out: Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    serve: bool = True,
    sequences: int = 96,
    seq_len: int = 256,
) -> Path:
    """Build the demo run and serve it with the live default model until Ctrl-C."""
    live = live_session()
    run_dir = build_demo(
        out,
        sequences=sequences,
        seq_len=seq_len,
        log=lambda m: print(m, file=sys.stderr),
        session=live,
    )
    if not serve:
        return run_dir
    from headscope.server.serve import serve as start

    handle = start(run_dir, live(), host=host, port=port)
    print(
        f"headscope demo: open {handle.browser_url if hasattr(handle, 'browser_url') else handle.url}",
        flush=True,
    )
    print("(Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        handle.stop()
    return run_dir
