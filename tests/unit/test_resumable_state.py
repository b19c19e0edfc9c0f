"""Resumable text state: a pass stopped at a layer and continued later captures exactly (bit
for bit) what one uninterrupted pass captures, on a tiny model of every architecture; the live
session runs only the layers a request needs and continues its cached state for a deeper one."""

from __future__ import annotations

import pytest
import torch

from headscope.analysis.attribution import qk_attribution
from headscope.analysis.session import NeedsModel, Session, cached_only
from headscope.model.adapter import Capture
from tests.tiny_models import ARCHS, random_tokens, tiny_adapter

TEXT = "the cat sat on the mat; the cat sat on the mat again"


def assert_same(a: Capture, b: Capture) -> None:
    """Every captured tensor of ``a`` equals ``b``'s bit for bit (same keys, same values)."""
    for name in ("embed", "pos_embed", "resid_final"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    for name in ("resid_pre", "attn_out", "attn_contrib", "mlp_contrib"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys(), name
        for key in x:
            assert torch.equal(x[key], y[key]), (name, key)
    assert a.rope.keys() == b.rope.keys()
    for key in a.rope:
        assert all(torch.equal(u, v) for u, v in zip(a.rope[key], b.rope[key], strict=True))
    assert a.layers.keys() == b.layers.keys()
    for key in a.layers:
        for part in ("q", "k", "v", "z"):
            assert torch.equal(getattr(a.layers[key], part), getattr(b.layers[key], part)), (
                key,
                part,
            )


@pytest.mark.parametrize("arch", ARCHS)
def test_resumed_passes_equal_one_pass(arch, one_thread):
    ad = tiny_adapter(arch)
    ids = random_tokens(14, seed=3)
    kw = dict(patterns=False, residuals=True, logits=False)
    full = ad.run(ids, **kw)
    assert full.stopped_after is None and len(full.layers) == ad.spec.n_layers
    for stops in ([-1, 0, 1], [0], [1], [2], [0, 2], [-1]):
        cap = ad.run(ids, stop_after=stops[0], **kw)
        assert cap.stopped_after == stops[0]
        assert sorted(cap.layers) == list(range(stops[0] + 1))
        assert cap.resid_final is None or stops[0] == ad.spec.n_layers - 1
        for stop in stops[1:]:
            before = dict(cap.layers)
            nxt = ad.run(ids, stop_after=stop, resume=cap, **kw)
            assert cap.layers == before  # the resumed capture is left as it was
            cap = nxt
        cap = ad.run(ids, resume=cap, **kw)
        assert cap.stopped_after is None
        assert_same(cap, full)


def test_resume_refuses_what_it_cannot_continue(one_thread):
    ad = tiny_adapter("llama")
    ids = random_tokens(8)
    kw = dict(patterns=False, residuals=True, logits=False)
    full = ad.run(ids, **kw)
    with pytest.raises(ValueError, match="nothing to resume"):
        ad.run(ids, resume=full, **kw)
    part = ad.run(ids, stop_after=1, **kw)
    with pytest.raises(ValueError, match="already ran layer 0"):
        ad.run(ids, stop_after=0, resume=part, **kw)
    with pytest.raises(ValueError, match="tokens"):
        ad.run(random_tokens(8, seed=1), resume=part, **kw)
    with pytest.raises(ValueError, match="residuals=True"):
        ad.run(ids, resume=part, patterns=False, logits=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_session_runs_only_the_layers_a_request_needs(arch, one_thread):
    ad = tiny_adapter(arch)
    session, reference = Session(ad), Session(ad)
    calls: list[int | None] = []
    run = ad.run

    def counting(*args, **kwargs):
        calls.append(kwargs.get("stop_after"))
        return run(*args, **kwargs)

    ad.run = counting  # type: ignore[method-assign]
    try:
        first = qk_attribution(session, TEXT, "L0H1", 9, 4)
        assert session.state(TEXT, through=0).layers_run == 1
        again = qk_attribution(session, TEXT, "L0H3", 9, 2)  # seen: no pass
        deeper = qk_attribution(session, TEXT, "L1H2", 9, 4)  # continues to layer 1
        assert calls == [0, 1]
        with cached_only():
            assert qk_attribution(session, TEXT, "L1H0", 8, 8).head == "L1H0"
            with pytest.raises(NeedsModel):
                qk_attribution(session, TEXT, "L2H0", 8, 8)
            with pytest.raises(NeedsModel):
                session.state("another text")
            with pytest.raises(NeedsModel):  # any forward pass, not just the session's
                run(random_tokens(4))
        full = session.state(TEXT)
        assert calls == [0, 1, None] and full.layers_run is None
        assert session.state(TEXT, through=1) is full
        assert_same(full.cap, reference.state(TEXT).cap)
    finally:
        del ad.run
    for result, (head, q, k) in (
        (first, ("L0H1", 9, 4)),
        (again, ("L0H3", 9, 2)),
        (deeper, ("L1H2", 9, 4)),
    ):
        assert result.model_dump() == qk_attribution(reference, TEXT, head, q, k).model_dump()
