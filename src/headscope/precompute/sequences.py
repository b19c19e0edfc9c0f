"""How documents become the sequences a precompute looks at.

The rule (packing): documents are read in their fixed order, tokenised without special tokens,
and laid end to end, each preceded by the BOS token (the model's document separator, see
``headscope.model.tokens``). The stream is cut into sequences of ``seq_len`` tokens. Every
sequence starts with a BOS at position 0 — the same attention sink for every sequence — followed
by ``seq_len - 1`` tokens of the stream; a sequence whose position 1 is in the middle of a
document is marked ``continued``. ``doc_starts`` lists the positions where a document's first
token sits, so an example always shows where its documents start. Sequence ``i`` is the same
whatever the batch size or number of processes, which makes runs resumable and shardable.

:func:`batched` groups sequences into batches and :func:`stack` pads a batch into tensors: the
precompute and the dictionary streams (training, feature labels) batch the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from headscope.data.readers import ReadReport, iter_documents
from headscope.model.tokens import Tokens

_TOKENIZE_CHUNK = 64  # documents per batched tokenizer call


@dataclass(frozen=True)
class Sequence:
    index: int
    ids: torch.Tensor  # [T] long, ids[0] is BOS
    doc_starts: torch.Tensor  # [T] bool, True at the first token of a document
    continued: bool  # position 1 continues a document begun in an earlier sequence
    sources: tuple[str, ...]  # id of each document that appears in the sequence


def _token_stream(
    tokens: Tokens, data: Path, text_field: str, report: ReadReport
) -> Iterator[tuple[int, bool, str]]:
    """(token id, starts a document, document id) for the packed stream, BOS separators included."""
    docs = iter_documents(data, text_field=text_field, report=report)
    while True:
        chunk = [d for _, d in zip(range(_TOKENIZE_CHUNK), docs, strict=False)]
        if not chunk:
            return
        encoded = tokens.tokenizer([d.text for d in chunk], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(chunk, encoded, strict=True):
            if not ids:
                continue
            yield tokens.bos_id, False, doc.id
            yield ids[0], True, doc.id
            for t in ids[1:]:
                yield t, False, doc.id


def iter_sequences(
    tokens: Tokens,
    data: Path,
    seq_len: int,
    *,
    text_field: str = "text",
    limit: int | None = None,
    report: ReadReport | None = None,
) -> Iterator[Sequence]:
    """Packed sequences of ``seq_len`` tokens from ``data``, in order (at most ``limit``)."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    report = report if report is not None else ReadReport()
    stream = _token_stream(tokens, data, text_field, report)
    index = 0
    pending: list[tuple[int, bool, str]] = []
    for item in stream:
        if not pending and item[0] == tokens.bos_id and not item[1]:
            continue  # the sequence's own BOS at position 0 doubles as this separator
        pending.append(item)
        if len(pending) == seq_len - 1:
            yield _make(tokens, index, pending)
            index += 1
            pending = []
            if limit is not None and index >= limit:
                return
    if pending and (limit is None or index < limit):
        yield _make(tokens, index, pending)


def _make(tokens: Tokens, index: int, items: list[tuple[int, bool, str]]) -> Sequence:
    ids = torch.tensor([tokens.bos_id, *(t for t, _, _ in items)], dtype=torch.long)
    starts = torch.tensor([False, *(s for _, s, _ in items)], dtype=torch.bool)
    sources = tuple(dict.fromkeys(doc for _, _, doc in items))
    return Sequence(index, ids, starts, continued=not items[0][1], sources=sources)


@dataclass(frozen=True)
class SequenceBatch:
    """A batch of sequences padded to its longest one (padding at the end)."""

    index: torch.Tensor  # [B] int64, dataset index of each sequence
    ids: torch.Tensor  # [B, T] int64, padded with the pad id
    doc_start: torch.Tensor  # [B, T] bool, True where a document starts (position 0 always)
    valid: torch.Tensor  # [B, T] bool, False for padding


def batched(seqs: Iterable[Sequence], size: int) -> Iterator[list[Sequence]]:
    """Consecutive batches of ``size`` sequences (the last one may be shorter)."""
    batch: list[Sequence] = []
    for s in seqs:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def stack(batch: list[Sequence], pad: int) -> SequenceBatch:
    """Pad ``batch`` with token ``pad`` to its longest sequence."""
    T = max(s.ids.shape[0] for s in batch)
    ids = torch.full((len(batch), T), pad, dtype=torch.long)
    starts = torch.zeros(len(batch), T, dtype=torch.bool)
    valid = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, s in enumerate(batch):
        n = s.ids.shape[0]
        ids[i, :n], starts[i, :n], valid[i, :n] = s.ids, s.doc_starts, True
    starts[:, 0] = True
    return SequenceBatch(torch.tensor([s.index for s in batch]), ids, starts, valid)
