"""Head ablations (headscope.analysis.ablate): the planted induction circuit, the batched
all-heads computation against a one-head-at-a-time reference, mean/resample semantics, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headscope.analysis.ablate import (
    AblationResult,
    ablate_heads,
    format_text,
    metric_column,
)
from headscope.analysis.ablation_hooks import ablating
from headscope.analysis.inputs import InputError
from headscope.analysis.synthetic import repeated_random_tokens
from headscope.model import ModelAdapter
from headscope.model.capture import CaptureRequest, capturing, eager_attention
from headscope.model.spec import parse_head
from tests.planted import induction_adapter
from tests.tiny_models import random_tokens, tiny_adapter

HALF = 15  # the planted model has 32 learned positions: BOS + 2 x 15 tokens


# ----- (1) the planted induction circuit -------------------------------------------------------
@pytest.fixture(scope="module")
def planted() -> ModelAdapter:
    return induction_adapter()


def test_previous_token_head_ablation_breaks_induction(planted: ModelAdapter) -> None:
    rep = repeated_random_tokens(planted, 16, HALF, seed=0)
    assert rep.tokens.shape == (16, 2 * HALF + 1)
    assert torch.equal(rep.tokens[:, 1 : HALF + 1], rep.tokens[:, HALF + 1 :])
    assert (rep.tokens[:, 0] == planted.tokens.bos_id).all()
    q = torch.tensor(rep.positions)  # the induction head at q attends to q - HALF + 1

    def induction_attention() -> float:
        pattern = planted.run(rep.tokens, layers=[1]).layers[1].weights()
        return float(pattern[:, 0, q, q - HALF + 1].mean())

    clean = induction_attention()
    with ablating(planted, ["L0H0"]):
        ablated = induction_attention()
    assert clean > 0.9 and ablated < 0.1, (clean, ablated)
    assert induction_attention() == clean  # the hooks are gone after the block

    for method in ("zero", "mean", "resample"):
        result = ablate_heads(planted, rep.tokens, method=method, positions=rep.positions)
        by_head = {a.head: a.delta for a in result.heads}
        others = [d for h, d in by_head.items() if h != "L0H0"]
        assert by_head["L0H0"] > max(others), (method, by_head)
        assert [a.head for a in result.ranked()[:2]] == ["L0H0", "L1H0"], (method, by_head)
        assert by_head["L1H0"] > 10 and abs(by_head["L0H1"]) < 1e-6, (method, by_head)


# ----- (2) batched == one head at a time -------------------------------------------------------
def _reference_loss(
    ad: ModelAdapter,
    tokens: torch.Tensor,
    heads: list[tuple[int, int]],
    values: dict[tuple[int, int], torch.Tensor | float],
    positions: list[int],
    targets: list[int],
) -> tuple[float, list[float]]:
    """One plain forward pass with ``heads`` replaced inside the attention function (not the
    output projection the library hooks): mean loss and mean target logits at ``positions``."""

    def override(layer, q, k, v, mask, scaling, softcap, window):
        _, pattern, out = eager_attention(q, k, v, mask, scaling, softcap, window)
        out = out.clone()
        for lay, h in heads:
            if lay == layer:
                out[:, :, h] = values[(lay, h)]
        return out, pattern

    req = CaptureRequest(override=override, store=False)
    with torch.no_grad(), capturing(req):
        logits = ad.model(input_ids=tokens, use_cache=False).logits.float()
    pos = torch.tensor(positions)
    loss_pos = pos[pos < tokens.shape[1] - 1]
    lp = logits[:, loss_pos]
    loss = F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tokens[:, loss_pos + 1].reshape(-1))
    return float(loss), logits[:, pos][..., targets].mean((0, 1)).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma2", "gpt2", "gpt_neox"])
def test_batched_equals_one_head_at_a_time(arch: str) -> None:
    ad = tiny_adapter(arch)
    tokens = random_tokens(10, seed=3, batch=3)
    mean_tokens = random_tokens(7, seed=4, batch=2)
    positions, targets = [2, 5, 8, 9], [7, 100]  # 9 is the last position: logits only
    names = [*ad.head_names(), "L0H1+L2H3"]
    clean = ad.run(tokens, patterns=False)
    mean_z = ad.run(mean_tokens, patterns=False).layers
    for method in ("zero", "mean", "resample"):
        # batch_size 5 splits the 3 copies of some ablations across two chunks.
        result = ablate_heads(
            ad,
            tokens,
            names,
            method=method,
            positions=positions,
            target_tokens=targets,
            mean_tokens=mean_tokens if method == "mean" else None,
            batch_size=5,
        )
        ref_clean, ref_clean_logits = _reference_loss(ad, tokens, [], {}, positions, targets)
        assert result.clean_loss == pytest.approx(ref_clean, abs=1e-5)
        assert result.clean_logits == pytest.approx(ref_clean_logits, abs=1e-5)
        perm = torch.tensor(result.resample_from or [0, 1, 2])
        if method == "resample":
            assert sorted(perm.tolist()) == [0, 1, 2] and (perm != torch.arange(3)).all()
        for a in result.heads:
            heads = [parse_head(n, ad.spec) for n in a.head.split("+")]
            values: dict[tuple[int, int], torch.Tensor | float] = {}
            for lay, h in heads:
                if method == "zero":
                    values[(lay, h)] = 0.0
                elif method == "mean":
                    values[(lay, h)] = mean_z[lay].z[:, :, h].mean((0, 1))
                else:
                    values[(lay, h)] = clean.layers[lay].z[perm][:, :, h]
            loss, logits = _reference_loss(ad, tokens, heads, values, positions, targets)
            assert a.loss == pytest.approx(loss, abs=1e-5), (method, a.head)
            assert a.delta == pytest.approx(loss - ref_clean, abs=1e-5), (method, a.head)
            want = [x - c for x, c in zip(logits, ref_clean_logits, strict=True)]
            assert a.logit_deltas == pytest.approx(want, abs=1e-5), (method, a.head)


# ----- (3) mean and resample semantics on known answers -----------------------------------------
def test_nothing_replaced_gives_the_clean_numbers() -> None:
    """Resampling between identical sequences replaces nothing: every ablated pass (started
    from the clean residual, in a batch of another size) reproduces the clean loss."""
    ad = tiny_adapter("llama")
    tokens = random_tokens(12, seed=5).repeat(4, 1)
    result = ablate_heads(ad, tokens, method="resample", target_tokens=[9], batch_size=7)
    assert result.clean_loss is not None
    for a in result.heads:
        assert a.loss == pytest.approx(result.clean_loss, abs=1e-6)
        assert a.logit_deltas == pytest.approx([0.0], abs=1e-6)


def test_mean_of_a_constant_head_is_the_head() -> None:
    """A head with no value weights outputs its value bias everywhere: mean-ablating it changes
    nothing, zero-ablating it does."""
    ad = tiny_adapter("gpt2")
    D = ad.spec.d_head
    d = ad.spec.d_model
    with torch.no_grad():  # GPT-2's fused c_attn: columns q | k | v, head 0 of v first
        ad.attn(1).c_attn.weight[:, 2 * d : 2 * d + D] = 0.0
    tokens = random_tokens(12, seed=6, batch=3)
    mean = ablate_heads(ad, tokens, ["L1H0", "L1H1"], method="mean")
    zero = ablate_heads(ad, tokens, ["L1H0"], method="zero")
    assert mean.heads[0].delta == pytest.approx(0.0, abs=1e-6)
    assert (
        abs(mean.heads[1].delta or 0.0) > 1e-5
    )  # an ordinary head does (random tiny weights: small)
    assert abs(zero.heads[0].delta or 0.0) > 1e-5
    assert mean.mean_sequences == 3
    other = ablate_heads(ad, tokens, ["L1H1"], method="mean", mean_tokens=tokens[:1])
    assert other.mean_sequences == 1 and other.heads[0].loss != mean.heads[1].loss


def test_resample_reads_the_same_position_of_another_sequence() -> None:
    """Two sequences sharing their first 6 tokens: every activation at positions 0..5 is the
    same in both (causal attention), so resampling any head changes nothing there, and changes
    the loss once the sequences differ."""
    ad = tiny_adapter("qwen2")
    tokens = random_tokens(12, seed=7, batch=2)
    tokens[1, :6] = tokens[0, :6]
    prefix = ablate_heads(ad, tokens, method="resample", positions=range(5), seed=3)
    assert prefix.resample_from == [1, 0]
    assert max(abs(a.delta or 0.0) for a in prefix.heads) < 1e-6
    rest = ablate_heads(ad, tokens, method="resample", positions=range(6, 11))
    assert max(abs(a.delta or 0.0) for a in rest.heads) > 1e-5


def test_repeated_tokens_from_a_vocabulary_size() -> None:
    rep = repeated_random_tokens(50, 3, 4, seed=1, bos_id=0)
    assert rep.tokens.shape == (3, 9) and (rep.tokens[:, 0] == 0).all()
    assert (rep.tokens[:, 1:] > 0).all() and (rep.tokens < 50).all()
    assert rep.positions == [5, 6, 7]
    assert torch.equal(rep.tokens, repeated_random_tokens(50, 3, 4, seed=1, bos_id=0).tokens)


# ----- output ----------------------------------------------------------------------------------
def test_text_table_and_metric_column(planted: ModelAdapter) -> None:
    rep = repeated_random_tokens(planted, 4, HALF, seed=1)
    result = ablate_heads(planted, rep.tokens, positions=rep.positions, target_tokens=[5])
    text = format_text(result)
    rows = [line.split()[0] for line in text.splitlines()[4:]]
    assert rows[:2] == ["L0H0", "L1H0"] and len(rows) == 4, text
    assert "clean loss" in text and "Δlogit" in text
    assert AblationResult.model_validate_json(result.model_dump_json()) == result
    column = metric_column(result)
    assert list(column.columns) == ["layer", "head", "name", "zero_ablation_loss_delta"]
    assert column.set_index("name").loc["L0H0", "layer"] == 0
    assert len(format_text(result, limit=1).splitlines()) == 6


# ----- (4) bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(heads=["L9H0"]), "unknown head"),
        (dict(heads=["attention"]), "malformed head"),
        (dict(heads=["L0H0+"]), "malformed head"),
        (dict(tokens=[]), "empty"),
        (dict(tokens=torch.zeros(2, 0, dtype=torch.long)), "empty"),
        (dict(tokens=[[1, 2], [3]]), "token ids"),
        (dict(tokens=[[1, 100000]]), "outside the vocabulary"),
        (dict(tokens=torch.ones(1, 4)), "integer"),
        (dict(method="max"), "unknown method"),
        (dict(method="resample", tokens=[[1, 5, 6]]), "at least 2 sequences"),
        (dict(positions=[40]), "outside the sequences"),
        (dict(positions=[-1]), "no scored position has a next token"),
        (dict(target_tokens=[-1]), "target tokens"),
        (dict(mean_tokens=[[1, 2]]), "only used by the mean method"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:
    ad = tiny_adapter("llama")
    args = {"tokens": random_tokens(6, batch=2), **kwargs}
    with pytest.raises(InputError, match=message) as err:
        ablate_heads(ad, **args)
    assert "\n" not in str(err.value)


def test_ablating_needs_a_head() -> None:
    with pytest.raises(InputError, match="at least one head"), ablating(tiny_adapter("gpt2"), []):
        pass
