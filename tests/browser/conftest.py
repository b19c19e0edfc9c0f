"""Fixtures for the browser tests: headless Chromium, a real run of a tiny random model (served
as a static export and by the real live server), a 5,120-head synthetic run for the hover
budget, a run of the real default model for the head-page budget, and the console-error guard.

Tiers: tests marked `browser` need Playwright and a Chromium binary (Debian's /usr/bin/chromium
by default, or $HEADSCOPE_CHROMIUM) and never touch the network. Tests also marked
`integration` need the real default model (see tests/README.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from headscope.analysis.session import Session
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.model import ModelAdapter
from headscope.precompute.attributions import precompute_attributions
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.runner import run_precompute
from headscope.server.serve import serve
from headscope.store.headvis import export_headvis, import_headvis
from headscope.store.static import export_static
from tests.browser.static_server import StaticServer
from tests.browser.synthetic_run import write_synthetic_run
from tests.tiny_models import build, build_tiny_run, save_tiny, write_texts

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("HEADSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Heads of the tiny run that get precomputed attributions (its strongest edge in the top example).
ATTRIBUTED = ["L1H0", "L2H3"]
# Layers of the code run that have a residual dictionary (the run has 3 layers: layer 1 has none).
DICTIONARY_LAYERS = [0, 2]
BIG = {"n_layers": 80, "n_heads": 64, "seed": 1}


# ------------------------------------------------------------------ browser


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HEADSCOPE_CHROMIUM)"
        )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser) -> Iterator:
    """A fresh page; fails the test if the page logged any console error or threw."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on(
        "console",
        lambda m: (
            errors.append(f"console.{m.type}: {m.text} @ {m.location}")
            if m.type == "error"
            else None
        ),
    )
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    pg.console_errors = errors
    yield pg
    pg.wait_for_timeout(50)
    context.close()
    assert not errors, "errors in the browser console:\n" + "\n".join(errors)


@pytest.fixture(scope="session")
def shot():
    """shot(page_or_locator, name, full_page=True): save test-artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def save(target, name: str, full_page: bool = True) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        if hasattr(target, "goto"):
            target.screenshot(path=str(path), full_page=full_page)
        else:
            target.screenshot(path=str(path))
        return path

    return save


# ------------------------------------------------------------------ the tiny real run


@dataclass(frozen=True)
class TinyRun:
    model_dir: Path  # a tiny random-weight llama saved as a local Hugging Face directory
    run_dir: Path  # `headscope precompute` output for it, with precomputed attributions


def write_corpus(path: Path) -> Path:
    """The unit tests' repetitive corpus, with its sentences on separate lines and a tab in
    every third document, so the examples show newline and tab tokens."""
    write_texts(path, n_docs=60)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    for i, doc in enumerate(docs):
        doc["text"] = doc["text"].replace(". ", ".\n") + ("\tend" if i % 3 == 0 else "")
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


# the browser's tiny runs: longer sequences and more PCA pairs than a unit test's
BROWSER_RUN = dict(
    sequences=16, seq_len=64, motif_sequences=8, pca_pairs=64, probe_sequences=4, probe_length=16
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyRun:
    """A real precompute of a tiny random llama (3 layers x 4 heads, byte-level tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = save_tiny("llama", root / "model")
    run_dir = build_tiny_run(
        root,
        model=model_dir,
        data=write_corpus(root / "data.jsonl"),
        # more examples than the default (6 + 2 per bucket) so every token kind the tests
        # look for (newlines, tabs, spaces) is among the shown examples
        top_k=10,
        per_bucket=3,
        sparse_top_k=3,
        sparse_threshold=0.05,
        **BROWSER_RUN,
    )
    precompute_attributions(run_dir, Session(ModelAdapter.load(str(model_dir))), ATTRIBUTED)
    return TinyRun(model_dir=Path(model_dir), run_dir=run_dir)


@pytest.fixture(scope="session")
def site(tiny, tmp_path_factory) -> Path:
    """`headscope export static` of the tiny run: the app at site/, the run at site/run/."""
    return export_static(tiny.run_dir, tmp_path_factory.mktemp("site") / "site")


@pytest.fixture(scope="session")
def run_dir(site) -> Path:
    return site / "run"


@pytest.fixture(scope="session")
def app_url(site) -> Iterator[str]:
    """URL of index.html of the static export (no live server)."""
    with StaticServer(site) as server:
        yield server.url + "index.html"


@pytest.fixture(scope="session")
def live_url(tiny) -> Iterator[str]:
    """Base URL of the real live server (`headscope serve`) on the tiny run and model."""
    handle = serve(tiny.run_dir, str(tiny.model_dir))
    try:
        yield handle.url
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def imported_app_url(tiny, tmp_path_factory) -> Iterator[str]:
    """The tiny run exported as a HeadVis tree and imported back (no PCA, similar heads, curves
    or motif map: HeadVis does not carry them), as a static export."""
    root = tmp_path_factory.mktemp("imported")
    tree = export_headvis(tiny.run_dir, root / "headvis")
    run = import_headvis(tree, root / "run")
    with StaticServer(export_static(run, root / "site")) as server:
        yield server.url + "index.html"


@pytest.fixture(scope="session")
def across_app_url(tiny, tmp_path_factory) -> Iterator[tuple[str, list[int]]]:
    """The tiny run mapped together with a copy of it whose heads are permuted (as if a second
    model), as a static export; yields the URL and the permutation (head j of the copy is head
    perm[j] of the run)."""
    import shutil

    import numpy as np

    from headscope.files import write_npy
    from headscope.precompute.motif_space import FEATURES_FILE, write_across

    root = tmp_path_factory.mktemp("across")
    a = shutil.copytree(tiny.run_dir, root / "tiny")
    b = shutil.copytree(tiny.run_dir, root / "other")
    feats = np.load(a / FEATURES_FILE)
    perm = np.random.default_rng(1).permutation(feats.shape[0])
    write_npy(b / FEATURES_FILE, feats[perm])
    write_across([a, b])
    with StaticServer(export_static(a, root / "site")) as server:
        yield server.url + "index.html", perm.tolist()


# ------------------------------------------------------------------ a tiny run on code


def code_tokenizer():
    """The tiny byte-level tokenizer plus BPE merges of newline + indentation runs, as the
    tokenizers of real code models have: "\\n   " and "\\n       " are single tokens (the last
    space of an indent goes with the next word, as in GPT-2's pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    nl, sp = "\u010a", "\u0120"  # the byte-level alphabet's "\\n" and " "
    merges = [
        (sp, sp),
        (sp * 2, sp * 2),
        (nl, sp),
        (nl, sp * 2),
        (nl + sp * 2, sp),
        (nl, sp * 4),
        (nl + sp * 4, sp * 2),
        (nl + sp * 6, sp),
        (nl, nl),
    ]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def write_code_corpus(path: Path, n_docs: int = 40) -> Path:
    """Small indented Python functions, one per document."""
    names = ["total", "count", "value", "item", "limit"]
    docs = []
    for i in range(n_docs):
        a, b = names[i % 5], names[(i + 2) % 5]
        docs.append(
            f"def f{i}({a}, {b}):\n    if {a} > {b}:\n        return {a} - {b}\n"
            f"    for x in {b}:\n        {a} += x\n    return {a}\n"
        )
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def residual_sae(d_model: int, layer: int, seed: int) -> SAE:
    """A random TopK residual SAE entering `layer`, scaled to the tiny model's residual."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=d_model, d_sae=64, architecture="topk", k=8, site="resid", layers=(layer,))
    sae = SAE(cfg, generator=g)
    with torch.no_grad():
        sae.W_dec.mul_(0.05)
        sae.b_enc.copy_(0.01 * torch.rand(64, generator=g))
    return sae


@pytest.fixture(scope="session")
def code_run(tmp_path_factory) -> TinyRun:
    """A real precompute of the tiny llama with `code_tokenizer` on indented Python, in a run
    directory named "tiny-code" that holds residual dictionaries for DICTIONARY_LAYERS only."""
    root = tmp_path_factory.mktemp("code")
    tokenizer = code_tokenizer()
    model = build("llama")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config._attn_implementation = "sdpa"
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_code_corpus(root / "code.jsonl")
    run_dir = build_tiny_run(
        root, model=model_dir, data=data, name="tiny-code", **{**BROWSER_RUN, "sequences": 8}
    )
    for layer in DICTIONARY_LAYERS:
        sae = residual_sae(model.config.hidden_size, layer, seed=layer)
        save_sae(sae, run_dir / "dictionaries" / f"resid_L{layer}")
    return TinyRun(model_dir=model_dir, run_dir=run_dir)


@pytest.fixture(scope="session")
def code_live_url(code_run) -> Iterator[str]:
    """The real live server on the code run and its model (dictionaries from RUN/dictionaries)."""
    handle = serve(code_run.run_dir, str(code_run.model_dir))
    try:
        yield handle.url
    finally:
        handle.stop()


# ------------------------------------------------------------------ sizes a tiny run lacks


@pytest.fixture(scope="session")
def big_app_url(tmp_path_factory) -> Iterator[str]:
    """A synthetic 5,120-head static site (80 layers x 64 heads) for the hover budget."""
    root = tmp_path_factory.mktemp("big")
    run = write_synthetic_run(root / "run", **BIG)
    with StaticServer(export_static(run, root / "site")) as server:
        yield server.url + "index.html"


@pytest.fixture(scope="session")
def default_app_url(tmp_path_factory) -> Iterator[str]:
    """A static export of a small run of the real default model (built once per session)."""
    root = tmp_path_factory.mktemp("default")
    cfg = PrecomputeConfig(
        model="default",
        sequences=8,
        seq_len=256,
        batch_size=4,
        dtype="bf16",
        motif_sequences=8,
        probe_sequences=4,
        probe_length=16,
    )
    run_dir = run_precompute(cfg, root / "run", progress=False)
    timings = json.loads((run_dir / "manifest.json").read_text())["timings"]
    print(f"\ndefault-model run for the browser: {timings}")
    with StaticServer(export_static(run_dir, root / "site")) as server:
        yield server.url + "index.html"
