"""Tokenisation with one BOS rule for every model, and faithful per-token display strings.

The BOS rule: a text is tokenised without special tokens and exactly one BOS token is put in
front, so position 0 is always the same kind of "start of document" token for every model. The
BOS token is the model's document separator: a built-in model may name it (SmolLM2:
``<|endoftext|>``); otherwise the tokenizer's ``bos_token``, falling back to its ``eos_token``
(GPT-2 and Pythia have no separate BOS and use ``<|endoftext|>`` between documents).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by byte-level BPE tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _piece_bytes(piece: str, byte_level: bool) -> bytes | None:
    """Raw bytes of a vocabulary piece, or None for a special token shown as is."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
    if byte_level:
        dec = _byte_decoder()
        if all(ch in dec for ch in piece):
            return bytes(dec[ch] for ch in piece)
        return None
    return piece.replace("▁", " ").encode("utf-8")


def _render(raw: bytes) -> str:
    """UTF-8 decode; bytes that are not valid UTF-8 on their own show as ``\\xNN``."""
    return raw.decode("utf-8", errors="backslashreplace")


class Tokens:
    """Tokenizer wrapper applying the BOS rule and rendering display strings."""

    def __init__(self, tokenizer, bos_token: str | None = None):
        self.tokenizer = tokenizer
        name = bos_token or tokenizer.bos_token or tokenizer.eos_token
        if name is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sequences")
        bos_id = tokenizer.convert_tokens_to_ids(name)
        if bos_id is None or bos_id == tokenizer.unk_token_id and name != tokenizer.unk_token:
            raise ValueError(f"BOS token {name!r} is not in the vocabulary")
        self.bos_token = name
        self.bos_id = int(bos_id)
        # Byte-level BPE (GPT-2 style) spells a leading space "Ġ"; SentencePiece spells it "▁".
        probe = tokenizer(" a", add_special_tokens=False)["input_ids"]
        first = tokenizer.convert_ids_to_tokens(probe[0]) if probe else ""
        self.byte_level = first.startswith("Ġ") or first == "Ġ"
        self.special_ids = set(tokenizer.all_special_ids)
        self._cache: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the BOS in front."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.bos_id, *ids]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids (BOS first) and each token's character span in ``text`` (BOS: (0, 0))."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [self.bos_id, *enc["input_ids"]], [(0, 0), *map(tuple, enc["offset_mapping"])]

    def span_positions(self, text: str, start: int, end: int) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and the positions of tokens overlapping characters [start, end)."""
        ids, offsets = self.encode_with_offsets(text)
        inside = [i for i, (a, b) in enumerate(offsets) if i > 0 and a < end and b > start]
        return ids, inside

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor([self.encode(text)], dtype=torch.long)  # [1, T]

    def display(self, token_id: int) -> str:
        """How one token reads on screen: spaces, newlines and partial UTF-8 bytes kept."""
        token_id = int(token_id)
        if token_id not in self._cache:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            raw = None if token_id in self.special_ids else _piece_bytes(piece, self.byte_level)
            self._cache[token_id] = piece if raw is None else _render(raw)
        return self._cache[token_id]

    def displays(self, ids) -> list[str]:
        return [self.display(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
