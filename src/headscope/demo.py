"""``headscope demo``: the whole product on the embedded default model, from nothing.

Builds the default corpus, precomputes the default model on it, precomputes attributions for the
most distinctive heads, trains residual dictionaries for two layers, then serves the run with the
live model (and the dictionaries, for feature-basis attributions) and prints the URL to open.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from headscope.files import atomic_dir
from headscope.model.loading import cache_dir

DEMO_METRICS = (
    "prev_token_score",
    "induction_score",
    "prefix_matching_score",
    "duplicate_token_score",
    "self_attention_score",
)


def default_demo_dir() -> Path:
    return cache_dir() / "runs" / "demo"


def build_demo(
    out: Path | None = None,
    *,
    sequences: int = 64,
    seq_len: int = 256,
    dict_tokens: int = 100_000,
    label_tokens: int = 30_000,
    log=print,
) -> Path:
    """Precompute the demo run (resumes or reuses a finished one); returns its directory.

    The run gets residual dictionaries for two layers (those of its strongest induction and
    previous-token heads) in ``RUN/dictionaries/``, so feature-basis attributions work."""
    from headscope.data.corpus import ensure_default_corpus
    from headscope.precompute.config import PrecomputeConfig
    from headscope.precompute.runner import run_precompute
    from headscope.store import open_run

    out = out or default_demo_dir()
    t0 = time.perf_counter()
    corpus = ensure_default_corpus()
    log(f"[1/4] default corpus: {corpus}")
    cfg = PrecomputeConfig(
        model="default",
        data=str(corpus),
        sequences=sequences,
        seq_len=seq_len,
        batch_size=4,
        dtype="bf16",
    )
    log(f"[2/4] precomputing {sequences} sequences x {seq_len} tokens into {out}")
    run_precompute(cfg, out)
    run = open_run(out)
    if not run.manifest.get("attributions"):
        from headscope.analysis.session import Session
        from headscope.model import ModelAdapter
        from headscope.precompute.attributions import precompute_attributions

        m = run.metrics
        heads = list(
            dict.fromkeys(name for metric in DEMO_METRICS for name in m.nlargest(2, metric)["name"])
        )
        log(f"[3/4] precomputing attributions for {len(heads)} heads: {', '.join(heads)}")
        precompute_attributions(out, Session(ModelAdapter.load("default")), heads)
    dict_dir = out / "dictionaries"
    if dict_tokens > 0 and not dict_dir.is_dir():
        from headscope.dictionaries.pipeline import train_dictionaries

        m = run.metrics
        metrics = ("prefix_matching_score", "prev_token_score")
        layers = sorted({int(m.nlargest(1, c)["layer"].iloc[0]) for c in metrics})
        if len(layers) == 1:
            layers.append(max(0, layers[0] - 1))
        log(f"[4/4] training residual dictionaries for layers {layers} on {dict_tokens} tokens")
        with atomic_dir(dict_dir) as tmp:
            train_dictionaries(
                "default",
                corpus,
                "resid",
                sorted(layers),
                out=tmp,
                n_features=2048,
                k=32,
                n_tokens=dict_tokens,
                label_tokens=label_tokens,
                log=log,
            )
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
    run_dir = build_demo(
        out, sequences=sequences, seq_len=seq_len, log=lambda m: print(m, file=sys.stderr)
    )
    if not serve:
        return run_dir
    from headscope.server.serve import serve as start

    handle = start(run_dir, "default", host=host, port=port)
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
