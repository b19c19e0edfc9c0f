"""Key knockouts: a planted "A if present, otherwise B" head, exact against cheap, and the
dataset summary of priority pairs."""

from __future__ import annotations

import pytest
import torch

from headscope.analysis.knockout import PriorityCounter, knockout, priority_pairs
from headscope.analysis.rules import Rule
from headscope.analysis.session import Session
from headscope.errors import InputError
from tests.planted import induction_adapter
from tests.planted_scores import priority_adapter, random_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def session():
    return Session(priority_adapter())


def test_knocking_out_a_moves_the_attention_to_b(session):
    text = "xyBzzAqq"  # B at 3, A at 6
    r = knockout(session, text, "L0H0", -1, [6])
    assert r.knocked == [6] and r.query == 8
    assert r.before[6] > 0.99 and r.knocked_mass == pytest.approx(r.before[6])
    assert r.cheap[3] > 0.99 and r.cheap[6] == 0.0
    assert r.exact is not None and r.exact[3] > 0.99 and r.exact[6] == 0.0
    # layer 0 reads nothing earlier: exact and cheap are the same computation
    assert r.exact == pytest.approx(r.cheap, abs=1e-6)
    assert r.moves[0].key == 3 and r.moves[0].token == "B"
    assert r.scores[6] > r.scores[3] > r.scores[0]  # the score profile: A above B above the rest
    # the same keys chosen by a rule
    by_rule = knockout(session, text, "L0H0", -1, rule=Rule.model_validate({"key": {"text": "A"}}))
    assert by_rule.knocked == [6] and by_rule.cheap == r.cheap


def test_exact_differs_from_cheap_where_an_earlier_layer_reads_the_key():
    """In the induction circuit, L1H0 at the second 'q' (11) attends to 'w' (2) because L0H0
    copied 'q' (1) into position 2. Knocking out key 1 barely changes L1H0's own softmax (it
    gave key 1 almost nothing), but hiding it from L0H0 too takes the induction away."""
    sess = Session(induction_adapter())
    r = knockout(sess, "qwertyuiopqwertyuiop", "L1H0", 11, [1])
    assert r.before[2] > 0.9
    assert r.cheap[2] > 0.9
    assert r.exact is not None and r.exact[2] < 0.5
    assert r.moves[0].key == 2  # the largest change: the induction target loses it


def test_bad_knockouts_say_why(session):
    text = "xyBzzAqq"
    with pytest.raises(InputError, match="every key"):
        knockout(session, text, "L0H0", 2, [0, 1, 2])
    with pytest.raises(InputError, match="name keys or a rule"):
        knockout(session, text, "L0H0", 2)
    with pytest.raises(InputError, match="matches no key"):
        knockout(session, text, "L0H0", 2, rule=Rule.model_validate({"key": {"text": "A"}}))
    with pytest.raises(InputError, match="not in 0..2"):
        knockout(session, text, "L0H0", 2, [5])
    with pytest.raises(InputError, match="outside the text"):
        knockout(session, text, "L0H0", 40, [1])
    with pytest.raises(InputError, match="L7H0"):
        knockout(session, text, "L7H0", 2, [1])


@pytest.fixture(scope="module")
def dataset(session):
    texts = random_text(40, 20, "abcdefgAB  ", seed=1)
    tokens = session.adapter.tokens
    return [(i, tokens.encode_tensor(t)[0]) for i, t in enumerate(texts)]


def test_the_dataset_summary_names_a_then_b(session, dataset):
    r = priority_pairs(session.adapter, dataset, verify=1)
    assert r.sequences == len(dataset)
    assert [h.head for h in r.heads] == ["L0H0"]  # L0H1 is zero: uniform, never a priority
    top = r.pairs[0]
    assert (top.head, top.first, top.second) == ("L0H0", "A", "B")
    assert top.first_attention > 0.99 and top.second_before < 0.01 and top.second_after > 0.99
    ex = top.example
    ids = dataset[ex.sequence][1]
    assert session.adapter.tokens.display(int(ids[ex.first])) == "A"
    assert session.adapter.tokens.display(int(ids[ex.second])) == "B"
    assert ex.exact_second_after is not None and ex.exact_second_after > 0.99
    # every counted query of the planted head is an A-then-B query
    assert r.heads[0].events == sum(p.count for p in r.heads[0].pairs) == top.count


def test_priority_counter_merges_exactly(session, dataset):
    """Two halves merged give the one-pass counts, sums and examples."""
    from headscope.analysis.head_stream import run_layers

    ad = session.adapter

    def count(seqs) -> PriorityCounter:
        c = PriorityCounter(1, 2, ad.tokens.vocab_size)
        for i, ids in seqs:
            run_layers(
                ad,
                ids[None],
                [0],
                lambda t, ids=ids, i=i: c.update(
                    0, [0, 1], t.scores.float(), ids[None], torch.tensor([i])
                ),
            )
        return c

    one, a, b = count(dataset), count(dataset[:13]), count(dataset[13:])
    a.merge(b)
    for name, value in one.state_dict().items():
        torch.testing.assert_close(a.state_dict()[name], value, rtol=1e-12, atol=0, msg=name)
