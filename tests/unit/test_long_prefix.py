"""The long-prefix induction test (headscope.analysis.long_prefix) on a hand-set model with one
standard (short-prefix) induction head and one long-prefix induction head."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from headscope.analysis.long_prefix import format_text, long_prefix_test, prefix_sequences
from headscope.errors import InputError
from tests.planted import planted_adapter
from tests.tiny_models import VOCAB

C, P = 32, 32  # token code dims, one-hot position dims
PREV, PREV2 = C + P, 2 * C + P  # slots for the previous and the second previous token's code


def two_induction_model() -> GPT2LMHeadModel:
    """L0H0: previous-token head (code -> PREV slot); L0H1: second-previous-token head (code ->
    PREV2 slot). L1H0 matches the current token with a key's previous token (standard
    induction); L1H1 matches the current *and* the previous token with a key's previous and
    second previous token, at half the weight: one matching token is not enough for it."""
    d = 4 * C
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=d, n_layer=2, n_head=2, n_positions=P, n_inner=8)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    H = d // 2  # 64 dims per head
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]:
            ln.weight.fill_(1.0)
        model.transformer.wte.weight[:, :C] = torch.randint(0, 2, (VOCAB, C), generator=g) * 2.0 - 1
        model.transformer.wpe.weight[:, C : C + P] = torch.eye(P)
        w0 = model.transformer.h[0].attn.c_attn.weight  # [d, 3d]: q | k | v
        c = 8.0
        for p in range(P):
            w0[C + p, p] = c  # L0H0 query: position p
            w0[C + p, H + p] = c  # L0H1 query: position p
            if p + 1 < H:
                w0[C + p, d + p + 1] = c  # L0H0 key at j looks like p = j + 1
            if p + 2 < H:
                w0[C + p, d + H + p + 2] = c  # L0H1 key at j looks like p = j + 2
        w0[:C, 2 * d : 2 * d + C] = torch.eye(C)  # L0H0 value: the token code
        w0[:C, 2 * d + H : 2 * d + H + C] = torch.eye(C)  # L0H1 value: the token code
        proj0 = model.transformer.h[0].attn.c_proj.weight  # [d (z, head-major), d]
        proj0[:C, PREV : PREV + C] = torch.eye(C)
        proj0[H : H + C, PREV2 : PREV2 + C] = torch.eye(C)
        w1 = model.transformer.h[1].attn.c_attn.weight
        w1[:C, :C] = 1.5 * torch.eye(C)  # L1H0 query: current code
        w1[PREV : PREV + C, d : d + C] = torch.eye(C)  # L1H0 key: previous token's code
        a = 0.75
        w1[:C, H : H + C] = a * torch.eye(C)  # L1H1 query: current code ...
        w1[PREV : PREV + C, H + C : H + 2 * C] = a * torch.eye(C)  # ... and the previous one
        w1[PREV : PREV + C, d + H : d + H + C] = a * torch.eye(C)  # L1H1 key: previous ...
        w1[PREV2 : PREV2 + C, d + H + C : d + H + 2 * C] = a * torch.eye(C)  # ... and second
        w1[:C, 2 * d : 2 * d + C] = torch.eye(C)  # both copy the attended token's code
        w1[:C, 2 * d + H : 2 * d + H + C] = torch.eye(C)
        proj1 = model.transformer.h[1].attn.c_proj.weight
        proj1[:C, :C] = torch.eye(C)
        proj1[H : H + C, :C] = torch.eye(C)
    return model


@pytest.fixture(scope="module")
def adapter():
    return planted_adapter(two_induction_model(), "two-induction")


def test_sequences_match_exactly_m_tokens(adapter) -> None:
    for m in (1, 3):
        ids, q, k = prefix_sequences(adapter, m, 16, 30, seed=0)
        assert ids.shape == (16, 30) and q == 29 and k == 2 + m
        assert torch.equal(ids[:, q - m + 1 : q + 1], ids[:, 2 : 2 + m])  # the m-token match
        assert (ids[:, q - m] != ids[:, 1]).all()  # X != Y: not m + 1
        bad, _, _ = prefix_sequences(adapter, m, 16, 30, seed=0, corrupt=True)
        assert torch.equal(bad[:, q], ids[:, q])  # the query token still matches
        if m > 1:
            assert (bad[:, q - m + 1 : q] != ids[:, 2 : 1 + m]).any()


def test_short_and_long_prefix_heads_are_told_apart(adapter) -> None:
    r = long_prefix_test(adapter, range(1, 5), n_sequences=24, seq_len=30)
    by = {h.head: h for h in r.heads}
    short, long_ = by["L1H0"], by["L1H1"]
    assert short.kind == "short" and long_.kind == "long", (short, long_)
    assert by["L0H0"].kind == "none" and by["L0H1"].kind == "none"
    assert short.attention[0] > 0.5  # one matching token is enough for standard induction
    assert long_.attention[0] < 0.5 * max(long_.attention[1:])
    # the corrupted prefix takes the long-prefix head back to its one-token level
    for m in range(1, 4):
        assert long_.corrupted_attention[m] < 0.6 * long_.attention[m], long_
        assert long_.corrupted_attention[m] == pytest.approx(long_.attention[0], abs=0.15)
    # both heads copy the target: positive direct logit attribution that follows attention
    assert min(short.dla) > 0 and long_.dla[3] > long_.dla[0] > 0
    assert max(abs(x) for x in by["L0H0"].dla) < 0.1  # it writes slots the unembedding ignores
    text = format_text(r)
    assert "L1H1" in text and "1 long-prefix, 1 short-prefix" in text


def test_bad_input(adapter) -> None:
    with pytest.raises(InputError, match="positive"):
        long_prefix_test(adapter, [0, 1])
    with pytest.raises(InputError, match="too short"):
        long_prefix_test(adapter, [8], seq_len=12)
    with pytest.raises(InputError, match="positions"):
        long_prefix_test(adapter, [1], seq_len=64)


def test_stored_with_a_run(tmp_path, capsys) -> None:
    from headscope.cli import main
    from headscope.files import read_json
    from headscope.store import open_run
    from tests.tiny_models import build_tiny_run, tiny_tokenizer

    two_induction_model().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    run = build_tiny_run(tmp_path, model=tmp_path / "model", seq_len=31, probe_length=12)
    args = ["long-prefix", str(run), "--prefix-lengths", "1", "2", "3", "--seq-len", "30"]
    assert main([*args, "--sequences", "16", "--add-column"]) == 0
    out = capsys.readouterr().out
    assert "1 long-prefix, 1 short-prefix" in out and "added long_prefix_kind" in out
    kind = open_run(run).metrics.set_index("name")["long_prefix_kind"]
    assert kind.to_dict() == {"L0H0": 0.0, "L0H1": 0.0, "L1H0": 1.0, "L1H1": 2.0}
    head = read_json(run / "heads" / "L1H1.json")
    assert len(head["curves"]["long_prefix_attention"]) == 3
    assert head["curves"]["long_prefix_dla"][1] > head["curves"]["long_prefix_dla"][0]
    assert head["metrics"]["long_prefix_kind"] == 2.0
    assert "long-prefix induction" in read_json(run / "metrics.json")["docs"]["long_prefix_kind"]
    # the head page draws a stored curve against 1..n: other prefix lengths are not stored
    gaps = ["long-prefix", str(run), "--prefix-lengths", "1", "3", "--add-column"]
    assert main(gaps) == 2
    assert "1 2 ... n (not 1 3)" in capsys.readouterr().err


def test_served_for_chosen_heads_and_bounded(adapter) -> None:
    """POST /api/long-prefix: the chosen heads' curves, equal to the library call (one
    implementation); a request over the token budget, an unknown head or a bad prefix length is
    refused with a message, never a traceback."""
    from fastapi.testclient import TestClient

    from headscope.analysis.long_prefix import LongPrefixResult
    from headscope.analysis.session import Session
    from headscope.limits import MAX_LONG_PREFIX_TOKENS
    from headscope.server import create_app

    client = TestClient(create_app(None, Session(adapter)), raise_server_exceptions=False)
    body = {"heads": ["L1H1", "L1H0"], "prefix_lengths": [3, 1, 2], "n_sequences": 12,
            "seq_len": 24}  # fmt: skip
    resp = client.post("/api/long-prefix", json=body)
    assert resp.status_code == 200, resp.text
    r = LongPrefixResult.model_validate(resp.json())
    assert [h.head for h in r.heads] == ["L1H1", "L1H0"] and r.prefix_lengths == [1, 2, 3]
    assert [h.kind for h in r.heads] == ["long", "short"]
    direct = long_prefix_test(adapter, [1, 2, 3], n_sequences=12, seq_len=24)
    by = {h.head: h for h in direct.heads}
    for h in r.heads:
        assert h.attention == pytest.approx(by[h.head].attention, abs=1e-6)
        assert h.dla == pytest.approx(by[h.head].dla, abs=1e-5)
    assert len(client.post("/api/long-prefix", json={"seq_len": 24}).json()["heads"]) == 4

    too_big = {"n_sequences": 256, "seq_len": 30}  # 8 lengths x 2 x 256 x 30 tokens
    resp = client.post("/api/long-prefix", json=too_big)
    assert resp.status_code == 422 and "Traceback" not in resp.text
    assert f"the limit is {MAX_LONG_PREFIX_TOKENS}" in resp.json()["detail"], resp.text
    for bad, needle in (
        ({"heads": ["L9H0"], "seq_len": 24}, "L9H0"),
        ({"prefix_lengths": [0]}, "prefix_lengths"),
        ({"prefix_lengths": [12], "seq_len": 24}, "too short"),
        ({"n_sequences": 2, "seq_len": 64}, "limit of 32 tokens"),  # the model's positions
        ({"seed": 2**62, "seq_len": 24}, "seed"),  # seed * 1000 overflowed the generator: a 500
    ):
        resp = client.post("/api/long-prefix", json=bad)
        assert resp.status_code == 422, (bad, resp.text)
        assert needle in resp.text and "Traceback" not in resp.text, resp.text
    small = TestClient(create_app(None, Session(adapter, max_tokens=20)))
    resp = small.post("/api/long-prefix", json={"seq_len": 24})
    assert resp.status_code == 422 and "this server's limit of 20" in resp.json()["detail"]
