"""Live analysis of long texts: the blocked attention summary, the session's token limit, and
the operations that re-run the model refusing texts too long for whole patterns."""

from __future__ import annotations

import pytest
import torch

import headscope.analysis.session as session_mod
import headscope.model.capture as capture_mod
from headscope.analysis.attend import attend, attend_summary
from headscope.analysis.attribution import qk_attribution, rank_heads
from headscope.analysis.inputs import encode_text
from headscope.analysis.session import Session, cached_only
from headscope.errors import InputError
from tests.planted import induction_adapter
from tests.tiny_models import tiny_adapter

TEXT = "qwertyuiopqwertyuiop"  # the planted model's context is 32 positions


def reference_summary(pattern: list[list[float]], top: int, threshold: float):
    """The token view's summary, written plainly from a dense pattern (rows 0..q)."""
    T = len(pattern)
    as_query, as_key, triples = [0.0] * T, [0.0] * T, []
    for q, row in enumerate(pattern):
        for k, w in enumerate(row):
            if k > 0:
                as_query[q] = max(as_query[q], w)
            if k != q:
                as_key[k] = max(as_key[k], w)
        kept = sorted((-w, k) for k, w in enumerate(row) if w >= threshold)[:top]
        triples += [(q, k, -nw) for nw, k in kept]
    return as_query, as_key, triples


def eager_pattern(ad, text: str, layer: int, h: int) -> list[list[float]]:
    """Head ``h`` of ``layer`` on ``text`` from a plain eager forward pass, rows 0..q."""
    ids = encode_text(ad, text)
    with torch.no_grad():
        pat = ad.run(ids, layers=[layer], patterns=True, logits=False).layers[layer].weights()
    return [row[: q + 1] for q, row in enumerate(pat[0, h].tolist())]


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "gemma2"])
@pytest.mark.parametrize("block", [1, 5, 64])
def test_summary_equals_the_dense_pattern_at_every_block_size(arch, block):
    ad = tiny_adapter(arch)
    session = Session(ad)
    text = "the cat sat on the mat; the cat sat on the hat, said the cat"
    head = "L1H1"
    dense = eager_pattern(ad, text, 1, 1)
    as_query, as_key, triples = reference_summary(dense, 3, 0.05)
    got = attend_summary(session, text, head, top=3, threshold=0.05, block=block)
    assert got.tokens == ad.tokens.displays(encode_text(ad, text)[0])
    assert got.max_as_query == pytest.approx(as_query, abs=2e-4)
    assert got.max_as_key == pytest.approx(as_key, abs=2e-4)
    assert [(q, k) for q, k, _ in got.top_keys] == [(q, k) for q, k, _ in triples]
    assert [w for _, _, w in got.top_keys] == pytest.approx([w for *_, w in triples], abs=2e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3", "gemma2"])
def test_attend_equals_an_eager_pass_and_answers_a_seen_text_from_the_cache(arch):
    """attend recomputes patterns from the session's cached q and k: the eager pass's weights
    (to float error), and a second call on the same text runs no forward pass."""
    ad = tiny_adapter(arch)
    session = Session(ad)
    text = "the cat sat on the mat; the cat sat on the hat"
    heads = ["L0H0", "L1H1", f"L{ad.spec.n_layers - 1}H{ad.spec.n_heads - 1}"]
    got = attend(session, text, heads)
    assert got.tokens == ad.tokens.displays(encode_text(ad, text)[0])
    for name in heads:
        layer, h = (int(x) for x in name[1:].split("H"))
        want = eager_pattern(ad, text, layer, h)
        assert [len(r) for r in got.patterns[name]] == [len(r) for r in want]
        assert [w for r in got.patterns[name] for w in r] == pytest.approx(
            [w for r in want for w in r], abs=2e-6
        )
    with cached_only():  # any forward pass would raise NeedsModel here
        again = attend(session, text, heads[:1])
    assert again.patterns[heads[0]] == got.patterns[heads[0]]


def test_summary_finds_the_planted_heads_keys():
    """On the hand-set model, L0H0's top key is the previous token and L1H0's, in the repeat,
    the token after the query token's first occurrence."""
    session = Session(induction_adapter())
    prev = attend_summary(session, TEXT, "L0H0", top=1)
    assert [(q, k) for q, k, _ in prev.top_keys if q >= 2] == [(q, q - 1) for q in range(2, 21)]
    induction = attend_summary(session, TEXT, "L1H0", top=1)
    firsts = {q: k for q, k, _ in induction.top_keys}
    # the second 'q' is at 11; its first occurrence at 1 is followed by 'w' at 2
    assert all(firsts[q] == q - 9 for q in range(11, 21)), firsts
    assert min(induction.max_as_query[11:]) > 0.5


def test_summary_never_builds_a_whole_pattern(monkeypatch):
    shapes = []
    real = session_mod.eager_attention

    def spy(q, k, *args, **kw):
        shapes.append((q.shape[2], k.shape[2]))
        return real(q, k, *args, **kw)

    monkeypatch.setattr(session_mod, "eager_attention", spy)
    session = Session(tiny_adapter("gpt2"))
    text = "abcdefghij" * 9  # 91 tokens
    attend_summary(session, text, "L0H0", block=16)
    assert shapes and max(rows for rows, _ in shapes) == 16
    assert sum(rows for rows, _ in shapes) == 91


def test_a_long_text_runs_past_the_default_limit_and_stays_exact(monkeypatch):
    """With the session's limit raised, a long text is analysed from the cache (attributions
    add up to the model's score), and the operations that re-run the model with edited
    attention compute it in blocks of query rows once whole patterns pass the budget (here
    shrunk so a 99-token text needs blocks): an exact knockout equals the whole-pattern one."""
    import headscope.analysis.knockout as knockout_mod
    from headscope.analysis.intervene import intervene

    ad = tiny_adapter("qwen3")
    session = Session(ad, max_tokens=120)
    text = "one two three four five six seven eight nine ten " * 2  # 99 tokens
    qk = qk_attribution(session, text, "L1H0", -1, 60)
    assert abs(qk.total - qk.score) <= 1e-4 * max(1.0, abs(qk.score))
    assert rank_heads(session, text, -1, 60).heads
    whole = knockout_mod.knockout(session, text, "L1H0", -1, keys=[60, 61])
    blocks = []
    real = capture_mod.query_block_for
    monkeypatch.setattr(capture_mod, "query_block_for", lambda *a: blocks.append(a) or 16)
    blocked = knockout_mod.knockout(session, text, "L1H0", -1, keys=[60, 61])
    monkeypatch.setattr(capture_mod, "query_block_for", real)
    assert blocks and real(1, ad.spec.n_heads, 99) is None
    assert blocked.exact == pytest.approx(whole.exact, abs=1e-6)
    assert blocked.exact_scores == pytest.approx(whole.exact_scores, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(whole.exact, whole.before, strict=True)) > 1e-4
    assert intervene(session, text, ["L1H0"], "embed", "key", 2.0, -1, 60).heads
    with pytest.raises(InputError, match="limit is 120"):
        session.state(text * 2)


def test_cli_and_server_take_the_token_limit(tmp_path, capsys):
    from headscope.cli import main
    from tests.tiny_models import save_tiny

    save_tiny("gpt2", tmp_path / "m")
    args = ["attend-summary", "--model", str(tmp_path / "m"), "--head", "L0H0"]
    assert main([*args, "--text", "abcdefghij", "--max-tokens", "5"]) != 0
    assert "limit is 5" in capsys.readouterr().err
    assert main([*args, "--text", "abcdefghij", "--max-tokens", "0"]) != 0
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback
    assert main([*args, "--text", "abcdefghij", "--json", "--max-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert '"max_as_query"' in out and '"top_keys"' in out


def test_summary_rejects_what_it_cannot_answer():
    session = Session(tiny_adapter("gpt2"))
    with pytest.raises(InputError):
        attend_summary(session, "abc", "L9H0")
    got = attend_summary(session, "a", "L0H0")  # BOS and one token
    assert len(got.max_as_query) == 2 and got.max_as_query[0] == 0.0
    assert torch.tensor(got.max_as_key).le(1.0).all()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("side", ["query", "key"])
def test_interventions_in_blocks_of_query_rows_equal_whole_patterns(
    monkeypatch, arch, freeze, side
):
    """Long texts re-run the edited layers in blocks of query rows (no T x T pattern): the
    same attention rows, scores, logits and curve as whole patterns, at blocks of 7 rows."""
    import headscope.analysis.intervene as intervene_mod

    ad = tiny_adapter(arch)
    text = "one two three four five six seven eight nine ten eleven twelve " * 2
    heads = ["L1H0", "L2H1"] if ad.spec.n_layers > 2 else ["L1H0"]
    args = (heads, "embed", side)

    def run(session):
        one = intervene_mod.intervene(session, text, *args, 4.0, -2, 9, freeze_patterns=freeze)
        curve = intervene_mod.intervention_curve(
            session, text, *args, [0.0, 0.5, 4.0], -2, 9, freeze_patterns=freeze
        )
        return one, curve

    whole = run(Session(ad))
    blocks = []
    real = capture_mod.query_block_for
    monkeypatch.setattr(capture_mod, "query_block_for", lambda *a: blocks.append(a) or 7)
    blocked = run(Session(ad))
    monkeypatch.setattr(capture_mod, "query_block_for", real)
    assert blocks  # the blocked path ran
    (w, wc), (b, bc) = whole, blocked
    moved = [abs(x - y) for x, y in zip(w.heads[0].row_after, w.heads[0].row_before, strict=True)]
    assert max(moved) > 2e-5  # 20x the tolerance below: the comparison is not vacuous
    for hw, hb in zip(w.heads, b.heads, strict=True):
        assert hb.row_after == pytest.approx(hw.row_after, abs=1e-6)
        assert hb.score_after == pytest.approx(hw.score_after, abs=1e-5)
    assert b.kl_divergence == pytest.approx(w.kl_divergence, abs=1e-6)
    assert [t.token for t in b.next_token_after] == [t.token for t in w.next_token_after]
    for cw, cb in zip(wc.heads, bc.heads, strict=True):
        assert cb.attention == pytest.approx(cw.attention, abs=1e-6)
        assert cb.score == pytest.approx(cw.score, abs=1e-5)
