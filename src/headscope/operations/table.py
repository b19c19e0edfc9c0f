"""Every live operation, declared once: request model, function, result model, text.

The server (``server/app.py``) turns each entry into ``POST /api/<path>`` and the CLI
(``cli.py``) into ``headscope <name> --flag ...`` with ``--json``; neither lists operations
itself. Adding a live capability is one function returning a result model
(:mod:`headscope.analysis.results`), one request model (:mod:`.requests`) and one entry here.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from headscope.analysis import results as R
from headscope.analysis.ablate import AblationResult
from headscope.analysis.intervene import InterventionCurve, curve_text
from headscope.analysis.long_prefix import LongPrefixResult
from headscope.analysis.long_prefix import format_text as long_prefix_text
from headscope.analysis.prompt_sets import PromptSetResult, prompt_set_text
from headscope.analysis.rule_results import DescribeResult, KnockoutResult
from headscope.errors import InputError, NoModel
from headscope.operations import requests as Q
from headscope.operations import text as T

if TYPE_CHECKING:
    from headscope.analysis.session import Session
    from headscope.dictionaries.basis import DictionarySet
    from headscope.dictionaries.feature_page import TextSource


class Context:
    """What an operation runs against: the model's session and the residual dictionaries.

    Both are loaded on first use (a CLI command that needs no dictionaries never reads them).
    ``text``: the served run's data, which feature pages read (None: the default corpus).
    """

    def __init__(
        self,
        session: Callable[[], Session] | Session | None,
        dictionaries: Callable[[], DictionarySet] | DictionarySet | None = None,
        text: TextSource | None = None,
    ):
        self._session = session
        self._dictionaries = dictionaries
        self.text = text

    @property
    def session(self) -> Session:
        if self._session is None:
            raise NoModel("no model loaded: start the server with --model M")
        if callable(self._session):
            self._session = self._session()
        return self._session

    @property
    def dictionaries(self) -> DictionarySet:
        if self._dictionaries is None:
            raise InputError(
                "no dictionaries loaded: pass --dictionaries DIR (residual SAEs: train-sae "
                "output or SAELens folders), or put them in RUN/dictionaries/"
            )
        if callable(self._dictionaries):
            self._dictionaries = self._dictionaries()
            if self._session is not None:  # where the model's activations are
                self._dictionaries.to(self.session.adapter.device)
        return self._dictionaries

    @property
    def has_dictionaries(self) -> bool:
        return self._dictionaries is not None

    def basis(self, name: str) -> DictionarySet | None:
        """The decomposition a request asks for: None = model components."""
        return None if name == "components" else self.dictionaries


@dataclass(frozen=True)
class Operation:
    """One live operation. ``name``'s words are the CLI subcommand and the URL path; the request
    and result models are the annotations of ``run(ctx, request) -> result``; ``text(result,
    request)`` is how the CLI prints it."""

    name: str
    help: str
    run: Callable[[Context, Any], BaseModel]
    text: Callable[[Any, Any], str]
    # request field -> CLI flag, where the flag differs from --field-name (e.g. heads -> --head)
    flags: dict[str, str] = field(default_factory=dict)
    # list fields the CLI reads from a file, one item per line
    files: tuple[str, ...] = ()
    # extra CLI flag -> (request field it sets, help): another way to give that field
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)
    # False: the CLI has its own subcommand of this name (a superset: e.g. runs and datasets)
    cli: bool = True

    @property
    def path(self) -> str:
        return self.name.replace(" ", "/")

    @property
    def request(self) -> type[Q.Request]:
        return typing.get_type_hints(self.run)["r"]

    @property
    def result(self) -> type[BaseModel]:
        return typing.get_type_hints(self.run)["return"]


def _tokenize(ctx: Context, r: Q.TokenizeRequest) -> R.TokenizeResult:
    from headscope.analysis.attend import tokenize

    return tokenize(ctx.session.adapter, r.text, max_tokens=ctx.session.max_tokens)


def _attend(ctx: Context, r: Q.AttendRequest) -> R.AttendResult:
    from headscope.analysis.attend import attend

    return attend(ctx.session, r.text, r.heads)


def _attend_summary(ctx: Context, r: Q.AttendSummaryRequest) -> R.AttendSummaryResult:
    from headscope.analysis.attend import attend_summary

    return attend_summary(ctx.session, r.text, r.head, top=r.top, threshold=r.threshold)


def _rank_heads(ctx: Context, r: Q.RankHeadsRequest) -> R.RankHeadsResult:
    from headscope.analysis.attribution import rank_heads

    return rank_heads(ctx.session, r.text, r.query, r.key)


def _qk(ctx: Context, r: Q.QKRequest) -> R.QKResult:
    from headscope.analysis.attribution import qk_attribution

    basis = ctx.basis(r.basis)
    return qk_attribution(ctx.session, r.text, r.head, r.query, r.key, top=r.top, basis=basis)


def _ov(ctx: Context, r: Q.OVRequest) -> R.OVResult:
    from headscope.analysis.attribution import ov_attribution

    basis = ctx.basis(r.basis)
    return ov_attribution(
        ctx.session, r.text, r.head, r.query, r.key, top=r.top, n_tokens=r.n_tokens, basis=basis
    )


def _composition(ctx: Context, r: Q.CompositionRequest) -> R.CompositionResult:
    from headscope.analysis.attribution import composition

    return composition(ctx.session, r.text, r.head, r.query, r.key, top=r.top)


def _sweep(ctx: Context, r: Q.SweepRequest) -> R.SweepResult:
    from headscope.analysis.sweep import sweep

    return sweep(ctx.session, r.template, r.value_list(), r.heads, r.query, r.key)


def _geometry(ctx: Context, r: Q.GeometryRequest) -> R.GeometryResult:
    from headscope.analysis.geometry import qk_geometry

    if r.preset == "country-city":
        from headscope.analysis.prompt_sets import country_city_geometry

        queries, keys, groups = country_city_geometry()
        return qk_geometry(ctx.session, queries, keys, r.heads, groups)
    return qk_geometry(ctx.session, r.queries, r.keys, r.heads, r.key_groups)


def _intervene(ctx: Context, r: Q.InterveneRequest) -> R.InterveneResult:
    from headscope.analysis.intervene import intervene

    return intervene(
        ctx.session,
        r.text,
        r.heads,
        r.component,
        r.side,
        r.scale,
        r.query,
        r.key,
        freeze_patterns=r.freeze_patterns,
        at=r.at,
        basis=ctx.basis(r.basis),
    )


def _virtual_weights(ctx: Context, r: Q.VirtualWeightsRequest) -> R.VirtualWeightsResult:
    from headscope.dictionaries.circuits import virtual_weights

    return virtual_weights(
        ctx.session.adapter, ctx.dictionaries, r.head, r.feature, r.side, top=r.top
    )


def _feature(ctx: Context, r: Q.FeatureRequest) -> R.FeaturePageResult:
    from headscope.dictionaries.feature_page import feature_page

    return feature_page(
        ctx.session.adapter,
        ctx.dictionaries,
        r.layer,
        r.feature,
        n_tokens=r.n_tokens,
        top=r.top,
        source=ctx.text,
    )


def _head_loadings(ctx: Context, r: Q.HeadLoadingsRequest) -> R.HeadLoadingsResult:
    from headscope.dictionaries.circuits import edge_head_loadings

    return edge_head_loadings(
        ctx.session,
        r.text,
        ctx.dictionaries,
        r.layer,
        r.source_feature,
        r.source_pos,
        r.target_feature,
        r.target_pos,
        target_vector=r.target_vector,
    )


def _edge_graph(ctx: Context, r: Q.EdgeGraphRequest) -> R.EdgeGraphResult:
    from headscope.dictionaries.edges import edge_graph

    return edge_graph(
        ctx.session,
        r.text,
        ctx.dictionaries,
        r.layer,
        r.feature,
        r.position,
        top=r.top,
        depth=r.depth,
        expand=r.expand,
        rank_by=r.rank_by,
        target_vector=r.target_vector,
        include_bos=r.include_bos,
    )


def _describe_text(ctx: Context, r: Q.DescribeTextRequest) -> DescribeResult:
    from headscope.analysis.describe import describe_text

    return describe_text(ctx.session, r.text, r.head, r.rules, counterexamples=r.counterexamples)


def _knockout(ctx: Context, r: Q.KnockoutRequest) -> KnockoutResult:
    from headscope.analysis.knockout import knockout

    return knockout(
        ctx.session, r.text, r.head, r.query, r.keys, r.rule, exact=not r.cheap_only, top=r.top
    )


def _intervention_curve(ctx: Context, r: Q.InterventionCurveRequest) -> InterventionCurve:
    from headscope.analysis.intervene import intervention_curve

    return intervention_curve(
        ctx.session,
        r.text,
        r.heads,
        r.component,
        r.side,
        r.scales,
        r.query,
        r.key,
        r.at,
        freeze_patterns=r.freeze_patterns,
        target=r.target,
        basis=ctx.basis(r.basis),
    )


def _prompt_set(ctx: Context, r: Q.PromptSetRequest) -> PromptSetResult:
    from headscope.analysis.prompt_sets import evaluate_prompts, preset

    prompts = preset(r.preset) if r.preset else r.prompts
    return evaluate_prompts(ctx.session, prompts, r.heads, detail=r.detail)


def _ablate(ctx: Context, r: Q.AblateRequest) -> AblationResult:
    from headscope.analysis.ablate_live import ablate

    return ablate(
        ctx.session,
        r.text,
        r.heads,
        method=r.method,
        task=r.task,
        positions=r.positions,
        n_sequences=r.n_sequences,
        half_len=r.half_len,
        seed=r.seed,
    )


def _long_prefix(ctx: Context, r: Q.LongPrefixRequest) -> LongPrefixResult:
    from headscope.analysis.long_prefix import long_prefix_test
    from headscope.limits import MAX_LONG_PREFIX_TOKENS

    if r.seq_len > ctx.session.max_tokens:
        raise InputError(
            f"seq_len {r.seq_len} exceeds this server's limit of {ctx.session.max_tokens} tokens"
        )
    return long_prefix_test(
        ctx.session.adapter,
        r.prefix_lengths,
        n_sequences=r.n_sequences,
        seq_len=r.seq_len,
        seed=r.seed,
        min_attention=r.min_attention,
        long_ratio=r.long_ratio,
        heads=r.heads,
        max_tokens=MAX_LONG_PREFIX_TOKENS,
    )


OPERATIONS: list[Operation] = [
    Operation(
        "tokenize",
        "the tokens of a text as the model sees them (BOS first)",
        _tokenize,
        T.tokenize_text,
    ),
    Operation(
        "attend",
        "attention patterns of heads on a text",
        _attend,
        T.attend_text,
        flags={"heads": "--head"},
    ),
    Operation(
        "attend-summary",
        "one head's attention on a text of any length (up to the server's token limit): each "
        "token's largest weight as query and as key, and each query's top keys; no T x T "
        "pattern is built",
        _attend_summary,
        T.attend_summary_text,
    ),
    Operation(
        "rank-heads",
        "every head's attention and score on one (query, key) pair, highest attention first",
        _rank_heads,
        T.rank_heads_text,
    ),
    Operation(
        "attribute qk",
        "exact QK attribution: a head's score on (query, key) as query x key component terms",
        _qk,
        T.qk_text,
    ),
    Operation(
        "attribute ov",
        "exact OV attribution: what a head moves from key to query, by key-side component",
        _ov,
        T.ov_text,
    ),
    Operation(
        "composition",
        "earlier heads driving an edge's score, at the key (K-) and at the query (Q-composition)",
        _composition,
        T.composition_text,
    ),
    Operation(
        "sweep",
        "attention on a (query, key) pair while one template slot takes each value",
        _sweep,
        T.sweep_text,
        flags={"heads": "--head"},
        aliases={"--range": ("values", "integers START:STOP[:STEP], stop excluded")},
    ),
    Operation(
        "geometry",
        "QK geometry: cosines of mean-subtracted queries vs keys on marked tokens",
        _geometry,
        T.geometry_text,
        flags={"heads": "--head"},
        files=("queries", "keys"),
    ),
    Operation(
        "intervene",
        "scale one component's contribution inside chosen heads' query or key",
        _intervene,
        T.intervene_text,
        flags={"heads": "--head"},
    ),
    Operation(
        "virtual-weights",
        "features nearest to a feature through a head's W_Q / W_K (same side and other side)",
        _virtual_weights,
        T.virtual_weights_text,
    ),
    Operation(
        "feature",
        "a residual dictionary feature's page: label, top contexts, activation histogram, the "
        "heads that read it (query / key side) and write it, its nearest features by virtual "
        "weight",
        _feature,
        T.feature_text,
    ),
    Operation(
        "head-loadings",
        "each head's share of a feature-to-feature edge between adjacent layers",
        _head_loadings,
        T.head_loadings_text,
    ),
    Operation(
        "edge-graph",
        "the largest attention-mediated edges into a feature from features at earlier positions, "
        "per layer pair, each split over heads plus the residual and MLP bypass",
        _edge_graph,
        T.edge_graph_text,
    ),
    Operation(
        "describe-text",
        "test a head's description (named rules over query/key pairs) on one text: coverage "
        "and counterexamples",
        _describe_text,
        T.describe_text,
    ),
    Operation(
        "knockout",
        "remove keys (or the keys a rule matches) from a head's softmax at one query and see "
        "where the attention goes",
        _knockout,
        T.knockout_text,
    ),
    Operation(
        "intervention-curve",
        "sweep the scale of one component at one source position inside chosen heads' query "
        "or key: attention, score and a next token's logit per scale",
        _intervention_curve,
        curve_text,
        flags={"heads": "--head", "scales": "--scale"},
    ),
    Operation(
        "prompt-set",
        "every head over a prompt set marking query and key tokens: attention, score and rank "
        "of the marked key, accuracy of 'the head attends most (or least) to it', per group",
        _prompt_set,
        prompt_set_text,
        flags={"heads": "--head"},
        files=("prompts",),
    ),
    Operation(
        "ablate",
        "zero-, mean- or resample-ablate heads (default: every head, batched) and measure the "
        "change in next-token loss",
        _ablate,
        T.ablate_text,
        cli=False,
    ),
    Operation(
        "long-prefix",
        "the long-prefix induction test on random tokens: per matched prefix length, each head's "
        "attention and direct logit attribution to the induction target, a corrupted-prefix "
        "control, and its class (short- or long-prefix induction)",
        _long_prefix,
        long_prefix_text,
        cli=False,
    ),
]
