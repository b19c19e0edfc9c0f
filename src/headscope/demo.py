"""``headscope demo``: the whole product on the embedded default model, from nothing.

Builds the default corpus, precomputes the default model on it, precomputes attributions for the
most distinctive heads, then serves the run with the live model and prints the URL to open. The
server has a residual dictionary per layer for feature-basis attributions: those trained on this
machine before (in ``$HEADSCOPE_CACHE/dictionaries/``) at once, the others as a background
process finishes them. Every step that takes a while shows a progress bar with an ETA on stderr;
a finished step is reused. One float32 copy of the model serves step 3 and then the server.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headscope.files import read_json
from headscope.memory import release_freed_memory
from headscope.model.loading import cache_dir, fast_dtype

if TYPE_CHECKING:
    from headscope.analysis.session import Session
    from headscope.dictionaries.background import LiveDictionaries
    from headscope.model import ModelAdapter

DEMO_METRICS = (
    "prev_token_score",
    "induction_score",
    "prefix_matching_score",
    "duplicate_token_score",
    "self_attention_score",
)


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


def default_dictionary_dir(model: str = "default") -> Path:
    """Where the demo's dictionaries of ``model`` are kept: once per machine."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return cache_dir() / "dictionaries" / safe


def demo_dictionaries(
    run_dir: Path,
    adapter: ModelAdapter,
    folder: Path | None = None,
    *,
    model: str = "default",
    log=print,
    **settings: Any,
) -> LiveDictionaries:
    """The demo's residual dictionaries: one per layer of ``adapter``'s model, those already
    trained loaded from ``folder`` (default: :func:`default_dictionary_dir`), the rest trained
    by :meth:`LiveDictionaries.start`. The layers of the run's strongest previous-token and
    prefix-matching heads come first. ``settings``: :class:`LayerwiseConfig` fields (its
    defaults are the demo's; docs/dictionaries.md has the table they give on the default
    model)."""
    from headscope.dictionaries.background import LiveDictionaries
    from headscope.dictionaries.layerwise import LayerwiseConfig
    from headscope.store import open_run

    run = open_run(run_dir)
    m = run.metrics
    first = [int(m.nlargest(1, c)["layer"].iloc[0]) for c in DEMO_METRICS[:3]]
    layers = list(dict.fromkeys([*first, *range(adapter.spec.n_layers)]))
    cfg = LayerwiseConfig(model=model, data=run.manifest["config"]["data"], **settings)
    dicts = LiveDictionaries(folder or default_dictionary_dir(model), cfg, layers)
    n = len(dicts.by_layer)
    log(f"[4/4] dictionaries: {n} of {len(layers)} layers ready in {dicts.folder}")
    return dicts


def build_demo(
    out: Path | None = None,
    *,
    sequences: int = 64,
    seq_len: int = 256,
    log=print,
    session: Callable[[], Session] | None = None,
    model: str = "default",
    data: Path | None = None,
) -> Path:
    """Precompute the demo run (resumes or reuses a finished one); returns its directory.

    Its residual dictionaries are :func:`demo_dictionaries`' (step 4, trained once per
    machine). ``session``: returns the live session step 3 uses (default: :func:`live_session`).
    ``model`` and ``data`` (default: the default corpus) are for tests."""
    from headscope.data.corpus import ensure_default_corpus
    from headscope.precompute.config import PrecomputeConfig
    from headscope.precompute.runner import run_precompute
    from headscope.progress import bar
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
        dtype=fast_dtype("cpu"),  # bf16 only where the CPU computes it natively
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
    """Build the demo run and serve it with the live default model until Ctrl-C.

    The server starts with the residual dictionaries already trained on this machine; the
    missing layers train in a low-priority child process (progress on stderr, in the app via
    ``/api/health``) and each is swapped into the live server when it is done. Without
    ``serve`` they train in the foreground, then the command returns."""

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    live = live_session()
    run_dir = build_demo(out, sequences=sequences, seq_len=seq_len, log=log, session=live)
    dicts = demo_dictionaries(run_dir, live().adapter, log=log)
    n = len(dicts.layers)
    if not serve:
        if dicts.start(log=log, nice=0):
            dicts.wait()
        return run_dir
    from headscope.server.serve import serve as start

    handle = start(run_dir, live(), host=host, port=port, dictionaries=dicts)
    print(f"headscope demo: open {handle.browser_url}", flush=True)
    if dicts.start(log=log):
        log(
            f"dictionaries: {n - len(dicts.by_layer)} of {n} layers train in the background "
            f"(low priority) into {dicts.folder}; each is used as soon as it is done"
        )
    print("(Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        dicts.stop()
        handle.stop()
    return run_dir
