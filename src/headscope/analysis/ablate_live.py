"""Ablations on what a live request names: one text, or the repeated-random-token task.

The batched computation is :func:`headscope.analysis.ablate.ablate_heads`; this module picks
the tokens and the scored positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from headscope.analysis.ablate import AblationResult, Method, ablate_heads
from headscope.analysis.session import Session
from headscope.analysis.synthetic import repeated_random_tokens
from headscope.errors import InputError

Task = Literal["text", "repeated"]
MAX_TASK_TOKENS = 1 << 16  # sequences x tokens of one live repeated-token ablation


def ablate(
    session: Session,
    text: str | None = None,
    heads: Sequence[str] | None = None,
    *,
    method: Method = "zero",
    task: Task = "text",
    positions: Sequence[int] | None = None,
    target_tokens: Sequence[int] | None = None,
    n_sequences: int = 8,
    half_len: int = 20,
    seed: int = 0,
) -> AblationResult:
    """Ablate ``heads`` (default every head, one at a time) and measure the next-token loss.

    ``task="text"``: on ``text`` at ``positions`` (default every position with a next token).
    ``task="repeated"``: on ``n_sequences`` sequences of BOS + ``half_len`` random tokens
    repeated, scored where induction predicts (the repeat); ``positions`` may not be given."""
    ad = session.adapter
    if task == "text":
        if not text:
            raise InputError("give a text to ablate on (or the repeated task)")
        tokens = session.state(text).ids
        if tokens.shape[1] < 2 and not target_tokens:
            raise InputError("the text is one token long: nothing to predict")
        if method == "resample":
            raise InputError("resample ablation needs several sequences: use the repeated task")
        pos = positions
    elif task == "repeated":
        if text:
            raise InputError("the repeated task makes its own tokens: give no text")
        if positions is not None:
            raise InputError("the repeated task scores the repeat's positions: give none")
        if n_sequences * (2 * half_len + 1) > MAX_TASK_TOKENS:
            raise InputError(f"at most {MAX_TASK_TOKENS} tokens (sequences x length) live")
        if 2 * half_len + 1 > session.max_tokens:
            raise InputError(f"sequences of {2 * half_len + 1} tokens exceed {session.max_tokens}")
        rep = repeated_random_tokens(ad, n_sequences, half_len, seed=seed)
        tokens, pos = rep.tokens, rep.positions
    else:
        raise InputError(f"unknown task {task!r}; use text or repeated")
    return ablate_heads(
        ad,
        tokens,
        list(heads) if heads else None,
        method=method,
        positions=pos,
        target_tokens=target_tokens,
        seed=seed,
    )
