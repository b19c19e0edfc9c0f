"""Head descriptions as rules: the rule language, coverage on a planted delimiter head, the
counterexamples of an incomplete description, and the ``describe`` command on a run."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from headscope.analysis.describe import (
    Coverage,
    RuleEngine,
    describe,
    describe_examples,
    describe_text,
)
from headscope.analysis.head_stream import head_patterns
from headscope.analysis.rules import RuleSet, load_rules
from headscope.analysis.session import Session
from headscope.errors import InputError
from tests.planted_scores import delimiter_adapter, random_text

pytestmark = pytest.mark.usefixtures("one_thread")

DESCRIPTION = """
# L0H0 of the planted model: every token looks back to the latest '.' or ','
rules:
  - name: latest delimiter
    key: {text: [".", ","], most_recent: true}
"""
INCOMPLETE = """
rules:
  - name: latest full stop
    key: {text: ".", most_recent: true}
"""


@pytest.fixture(scope="module")
def delimiter():
    adapter = delimiter_adapter()
    texts = random_text(24, 31, "abcde   .,", seed=3)
    seqs = [(i, adapter.tokens.encode_tensor(t)[0]) for i, t in enumerate(texts)]
    return adapter, seqs


def _describe(adapter, seqs, rules: str, **kw):
    return describe(
        head_patterns(adapter, seqs, "L0H0", batch_size=5),
        "L0H0",
        RuleSet.model_validate(rules),
        adapter.tokens.display,
        source="test",
        **kw,
    )


def test_a_description_of_the_delimiter_head_covers_its_attention(delimiter):
    adapter, seqs = delimiter
    r = _describe(adapter, seqs, DESCRIPTION)
    assert r.sequences == len(seqs) and r.queries == sum(len(s) - 1 for _, s in seqs)
    rule, everything = r.rules[0], r.all_rules
    assert rule.mass >= 0.99 and everything.mass >= 0.99
    assert rule.events == everything.events == 1.0 and r.events > 0
    assert rule.top_bucket == 1.0 and r.top_bucket == [0.9, 1.0]
    assert r.counterexamples == []
    # with the sink counted, one more rule describes the queries before the first delimiter
    sink = DESCRIPTION + "  - name: no delimiter yet\n    key: {position: 0}\ninclude_sink: true\n"
    r = _describe(adapter, seqs, sink)
    assert r.include_sink and r.all_rules.mass >= 0.99 and r.rules[0].mass < r.all_rules.mass


def test_an_incomplete_description_lists_the_missing_behaviour_first(delimiter):
    adapter, seqs = delimiter
    r = _describe(adapter, seqs, INCOMPLETE)
    assert r.all_rules.mass < 0.9
    first = r.counterexamples[0]
    assert first.key_token == "," and first.weight > 0.99
    assert all(c.key_token == "," for c in r.counterexamples)
    assert "[[,]]" in first.context or "[[{{,}}]]" in first.context
    assert r.uncovered_key_tokens[0].token == ","
    assert r.uncovered_key_tokens[0].share == pytest.approx(1 - r.all_rules.mass, abs=1e-6)
    shares = sum(d.share for d in r.uncovered_distances)
    assert shares == pytest.approx(1 - r.all_rules.mass, abs=1e-6)
    # counterexamples: strongest first, one per query
    weights = [c.weight for c in r.counterexamples]
    assert weights == sorted(weights, reverse=True)
    assert len({(c.sequence, c.query) for c in r.counterexamples}) == len(r.counterexamples)


def test_any_split_of_the_stream_gives_the_same_coverage(delimiter):
    adapter, seqs = delimiter
    rules = RuleSet.model_validate(INCOMPLETE)
    patterns = list(head_patterns(adapter, seqs, "L0H0"))
    one = Coverage(rules, adapter.tokens.display, counterexamples=5)
    for p in patterns:
        one.update(*p)
    a = Coverage(rules, adapter.tokens.display, counterexamples=5)
    b = Coverage(rules, adapter.tokens.display, counterexamples=5)
    for p in patterns[:7]:
        a.update(*p)
    for p in patterns[7:]:
        b.update(*p)
    a.merge(b)
    c = Coverage(rules, adapter.tokens.display, counterexamples=5)
    c.load_state_dict(a.state_dict())
    whole, merged = one.state_dict(), c.state_dict()
    for name, value in whole.items():  # float64 sums in another order: equal to rounding
        torch.testing.assert_close(merged[name], value, rtol=1e-12, atol=0, msg=name)
    assert one.result("L0H0", "x").counterexamples == c.result("L0H0", "x").counterexamples


def _loop(rule_yaml: str, ids: list[int], text) -> torch.Tensor:
    """The rule language's meaning, written out pair by pair for the rules below."""
    T = len(ids)
    tok = [text(i) for i in ids]
    out = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            d = q - k
            out[q, k] = {
                "prev": d == 1,
                "near": 2 <= d <= 4,
                "same": ids[q] == ids[k] and d >= 1,
                "induction": 1 <= k < q and ids[k - 1] == ids[q],
                "vowel key not a": tok[k] in "aeiou" and tok[k] != "a",
                "space query or late key": tok[q] == " " or k >= 10,
                "latest b": k == max([j for j in range(q + 1) if tok[j] == "b"], default=-1),
            }[rule_yaml]
    return out


RULES = {
    "prev": "distance: 1",
    "near": "distance: {min: 2, max: 4}",
    "same": "all: [{same_token: true}, {not: {distance: 0}}]",
    "induction": "induction: true",
    "vowel key not a": "key: {regex: '^[aeiou]$'}\n  not: {key: {text: a}}",
    "space query or late key": "any: [{query: {regex: '^ $'}}, {key: {position: {min: 10}}}]",
    "latest b": "key: {text: b, most_recent: true}",
}


@pytest.mark.parametrize("name", list(RULES))
def test_rules_mean_what_docs_describe_says(name):
    adapter = delimiter_adapter()
    ids = adapter.tokens.encode("ab aeb bab iba ob ua ")
    rules = RuleSet.model_validate(f"- name: {name}\n  {RULES[name]}\n")
    engine = RuleEngine(adapter.tokens.display)
    t = torch.tensor(ids)
    q, k = torch.arange(len(ids))[:, None], torch.arange(len(ids))[None, :]
    got = engine.mask(rules.rules[0], t, q, k) & (k <= q)
    assert torch.equal(got, _loop(name, ids, adapter.tokens.display))
    # a list of pairs gives the same answers as the grid
    qs, ks = torch.tril_indices(len(ids), len(ids))
    assert torch.equal(engine.mask(rules.rules[0], t, qs, ks), got[qs, ks])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rules: []", "at least 1"),
        ("- key: {text: a}", "needs a name"),
        ("- {name: x}", "at least one condition"),
        ("- {name: x, key: {}}", "text, regex or position"),
        ("- {name: x, key: {regex: '('}}", "bad regular expression"),
        ("- {name: x, query: {text: a, most_recent: true}}", "key side only"),
        ("- {name: x, distance: 1}\n- {name: x, distance: 2}", "unique"),
        ("- &a {name: x, distance: 1}\n- *a", "aliases"),
        ("- {name: x, distance: {min: 3, max: 1}}", "above max"),
        ("- {name: x, color: red}", "Extra inputs"),
        ("- {name: x, distance: 1", "not valid YAML"),
        ("- {name: x, " + "not: {" * 9 + "distance: 1" + "}" * 10, "nest"),
    ],
)
def test_bad_rules_say_what_is_wrong(text, needle):
    with pytest.raises(ValidationError, match=needle):
        RuleSet.model_validate(text)


def test_load_rules_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- {name: x, distance: nope}\n")
    with pytest.raises(InputError, match=r"r\.yaml: rules\.0\.distance"):
        load_rules(str(path))
    with pytest.raises(InputError, match="cannot read"):
        load_rules(str(tmp_path / "missing.yaml"))
    path.write_text(DESCRIPTION)
    assert load_rules(str(path)).names == ["latest delimiter"]


def test_describe_text_is_describe_on_one_sequence():
    adapter = delimiter_adapter()
    text = "ab c. de,f gh. i"
    live = describe_text(Session(adapter), text, "L0H0", RuleSet.model_validate(INCOMPLETE))
    ids = adapter.tokens.encode_tensor(text)[0]
    r = _describe(adapter, [(0, ids)], INCOMPLETE)
    assert live.model_dump(exclude={"source"}) == r.model_dump(exclude={"source"})
    assert live.counterexamples[0].context == " c. de[[{{,}}]]"


def test_describe_examples_reads_a_runs_head_payload():
    """Stored sparse patterns: the top bucket is the run's, entries below the stored threshold
    are missing (zero), the rest is the same arithmetic."""
    adapter = delimiter_adapter()
    ids = adapter.tokens.encode("ab. cd, e")
    examples = [
        {"sequence": 7, "tokens": ids, "sparse": [[q, 3 if q < 6 else 6, 1.0] for q in range(3, 9)]}
    ]
    payload = {
        "head": "L0H0",
        "examples": examples,
        "buckets": [{"lo": 0.9, "hi": 1.0, "examples": [0]}],
    }
    r = describe_examples(payload, RuleSet.model_validate(INCOMPLETE), adapter.tokens.display)
    assert r.sequences == 1 and r.top_bucket == [0.9, 1.0] and r.top_bucket_examples == 1
    assert r.all_rules.mass == pytest.approx(3 / 6) and r.total_mass == pytest.approx(6.0)
    exact = describe_examples(
        payload, RuleSet.model_validate(DESCRIPTION), adapter.tokens.display, adapter=adapter
    )
    assert exact.all_rules.mass >= 0.99 and "recomputed" in exact.source


def test_describe_command_on_a_run(tiny_run, tmp_path, capsys):
    from headscope.cli import main

    run = tiny_run()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: previous token\n    distance: 1\n"
        "  - name: itself\n    distance: 0\nmin_event: 0.2\n"
    )
    results = {}
    for on in ("stored", "examples", "dataset"):
        assert main(["describe", str(run), "L1H2", str(rules), "--on", on, "--json"]) == 0
        results[on] = json.loads(capsys.readouterr().out)
        assert [c["rule"] for c in results[on]["rules"]] == ["previous token", "itself"]
    assert results["dataset"]["sequences"] == 8  # the run's SMALL_RUN sequences
    assert results["examples"]["top_bucket"] == results["stored"]["top_bucket"]
    assert main(["describe", str(run), "L1H2", str(rules), "--sequences", "2"]) == 0
    out = capsys.readouterr().out
    assert "previous token" in out and "all rules" in out and "2 sequences" in out
    assert main(["describe", str(run), "L9H9", str(rules), "--on", "stored"]) == 2
    assert "L9H9" in capsys.readouterr().err


def test_the_documented_example_describes_the_delimiter_head(delimiter):
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "describe.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    adapter, seqs = delimiter
    r = _describe(adapter, seqs, example)
    assert r.all_rules.mass >= 0.99 and len(r.rules) == 2
