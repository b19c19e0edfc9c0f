"""Live routes about the served run itself (not one text): test a head's description on the run's
stored examples, save it with the run, and find "A if present, otherwise B" pairs on the head's
example sequences.

``POST /api/run/describe``             coverage of rules on a head's stored examples
``GET  /api/run/descriptions/{head}``  the saved description (rules text and coverage) or nulls
``PUT  /api/run/descriptions/{head}``  save rules (tested first) as ``RUN/descriptions/{head}.yaml``
                                       and their coverage as ``RUN/descriptions/{head}.json``
``POST /api/run/priority``             priority pairs of one head on its stored example sequences

``on: "stored"`` needs no model (the stored sparse patterns: the mass is a share of the stored
mass); ``on: "examples"`` recomputes the head's full patterns on the example sequences with the
live model, on the model queue like every other model call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headscope.analysis.rule_results import DescribeResult, PriorityResult
from headscope.analysis.rules import RuleSet
from headscope.errors import InputError, NoModel, NotFound
from headscope.operations.requests import HeadName, RuleSetInput
from headscope.server.responses import JSON, readable_errors

DESCRIPTIONS = "descriptions"
MAX_RULES_CHARS = 20_000


class RunDescribeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head: HeadName
    rules: RuleSetInput
    on: Literal["stored", "examples"] = Field(
        "stored",
        description="stored: the run's sparse patterns (no model); examples: the head's full "
        "patterns recomputed on its example sequences (needs the model)",
    )
    counterexamples: int = Field(10, ge=0, le=100)


class SaveDescriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: str = Field(
        min_length=1, max_length=MAX_RULES_CHARS, description="the rules as YAML text"
    )
    on: Literal["stored", "examples"] = "stored"


class SavedDescription(BaseModel):
    head: str
    rules: str | None = Field(description="the saved YAML text, null: none saved")
    result: DescribeResult | None = Field(description="its coverage when it was saved")


class RunPriorityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head: HeadName
    top: int = Field(10, ge=1, le=100)


def add_run_routes(app: FastAPI, run_root: Path | None, ctx: Any, queue: Any) -> None:
    """Register the routes above on ``app`` (``ctx``: the operation context with the session;
    ``queue``: the model queue)."""

    def run():
        from headscope.store import open_run

        if run_root is None:
            raise NotFound("this server has no run: start it with a run directory")
        return open_run(run_root)

    def head_payload(head: str) -> tuple[Any, dict]:
        from headscope.model.spec import parse_head

        try:
            layer, h = parse_head(head)
        except ValueError as err:
            raise InputError(str(err)) from None
        r = run()
        path = r.path / "heads" / f"L{layer}H{h}.json"
        if not path.is_file():
            raise NotFound(f"the run has no data for {head}")
        return r, r.head(f"L{layer}H{h}")

    def describe(head: str, rules: RuleSet, on: str, n: int) -> DescribeResult:
        from headscope.analysis.describe import describe_examples
        from headscope.files import read_json

        r, payload = head_payload(head)
        if on == "stored":
            vocab = read_json(r.path / "vocab.json")
            display = (lambda i: vocab[str(i)]) if isinstance(vocab, dict) else vocab.__getitem__
            return describe_examples(payload, rules, display, counterexamples=n)
        session = ctx.session
        if session is None:
            raise NoModel("testing on recomputed patterns needs a model: serve with --model")
        ad = session.adapter
        return describe_examples(payload, rules, ad.tokens.display, adapter=ad, counterexamples=n)

    async def run_describe(head: str, rules: RuleSet, on: str, n: int) -> DescribeResult:
        if on == "stored":  # no model: a thread of its own, never behind a forward pass
            return await asyncio.to_thread(describe, head, rules, on, n)
        return await queue.run(lambda: describe(head, rules, on, n))

    @app.post("/api/run/describe", response_model=DescribeResult)
    async def describe_on_run(req: RunDescribeRequest):
        """Test a head's description (named rules) on the run's stored examples of it."""
        result = await run_describe(req.head, req.rules, req.on, req.counterexamples)
        return JSON(result.model_dump())

    def paths(head: str) -> tuple[Path, Path]:
        r, payload = head_payload(head)
        folder = r.path / DESCRIPTIONS
        return folder / f"{payload['head']}.yaml", folder / f"{payload['head']}.json"

    @app.get("/api/run/descriptions/{head}", response_model=SavedDescription)
    async def saved_description(head: str):
        """The head's saved description and the coverage it had when saved (or nulls)."""
        from headscope.files import read_json

        yaml_path, json_path = paths(head)
        name = yaml_path.stem
        rules = yaml_path.read_text(encoding="utf-8") if yaml_path.is_file() else None
        result = read_json(json_path) if rules is not None and json_path.is_file() else None
        return JSON(SavedDescription(head=name, rules=rules, result=result).model_dump())

    @app.put("/api/run/descriptions/{head}", response_model=SavedDescription)
    async def save_description(head: str, req: SaveDescriptionRequest):
        """Test the rules, then save them and their coverage in the run folder."""
        from headscope.analysis.rules import read_yaml
        from headscope.files import atomic_file, write_json

        try:
            rules = RuleSet.model_validate(read_yaml(req.rules))
        except ValidationError as err:
            raise InputError(f"the rules: {readable_errors(err.errors())}") from None
        except ValueError as err:
            raise InputError(f"the rules are {err}") from None
        yaml_path, json_path = paths(head)
        result = await run_describe(yaml_path.stem, rules, req.on, 10)
        yaml_path.parent.mkdir(exist_ok=True)
        with atomic_file(yaml_path) as tmp:
            tmp.write_text(req.rules, encoding="utf-8")
        write_json(json_path, result.model_dump(), indent=1)
        return JSON(
            SavedDescription(head=yaml_path.stem, rules=req.rules, result=result).model_dump()
        )

    def priority(head: str, top: int) -> PriorityResult:
        import torch

        from headscope.analysis.knockout import priority_pairs

        _, payload = head_payload(head)
        session = ctx.session
        if session is None:
            raise NoModel("priority pairs need a model: serve with --model")
        seqs = [(int(e["sequence"]), torch.tensor(e["tokens"])) for e in payload["examples"]]
        if not seqs:
            raise NotFound(f"the run stores no example sequences for {head}")
        return priority_pairs(session.adapter, seqs, heads=[payload["head"]], top=top)

    @app.post("/api/run/priority", response_model=PriorityResult)
    async def priority_on_run(req: RunPriorityRequest):
        """'A if present, otherwise B' pairs of one head on its stored example sequences."""
        result = await queue.run(lambda: priority(req.head, req.top))
        return JSON(result.model_dump())
