"""Bounds that keep one request from tying up the model, the tokenizer or the browser.

Each limit is defined here once; the request models, the analysis functions and the error
messages all read it from here.
"""

from __future__ import annotations

MAX_TOKENS = 2048  # longest text a live analysis takes, BOS included
MAX_TEXT_CHARS = 100_000  # only stops a multi-megabyte body from being tokenised first
MAX_HEADS = 4096  # heads named in one request
MAX_SWEEP_VALUES = 1000  # values one sweep substitutes
MAX_GEOMETRY_PROMPTS = 200  # prompts per side of a QK geometry request
MAX_ATTEND_VALUES = 4_000_000  # attention weights one attend answer returns (heads x T(T+1)/2)
MAX_GEOMETRY_VALUES = 4_000_000  # cosines one geometry answer returns (heads x queries x keys)
MAX_POSITION = 1 << 40  # far beyond any context; only keeps numbers JSON-safe
# Tokens one live long-prefix test runs (prefix lengths x 2 x sequences x length): ~40 s of the
# default model on 2 CPU cores; the CLI's long-prefix command has no limit.
MAX_LONG_PREFIX_TOKENS = 1 << 14
