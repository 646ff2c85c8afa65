"""Token ids → the text each token stands for, correct for byte-level BPE and SentencePiece vocabularies.

A token is turned into its raw bytes first, then a window of tokens is decoded with an incremental UTF-8 decoder,
so a character split over several tokens (`é` as two byte tokens, CJK as three) is shown on the token that
completes it (the earlier ones show as empty "partial" tokens whose tooltip gives their bytes):

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2; decoder `ByteLevel`): every piece character maps back to one byte
  through GPT-2's `bytes_to_unicode` table (`Ġ` → space, `Ċ` → newline);
- SentencePiece (Llama 2, Gemma, Mistral; `Metaspace` or `Replace("▁", " ")` + `ByteFallback` decoders): `▁` is a
  space and `<0xHH>` pieces are single bytes;
- WordPiece: `##` continues a word, other pieces start with a space;
- anything else: the piece's own text (or `tokenizer.decode([id])` when there is no piece).

Special tokens (BOS, EOS, PAD, added special tokens) keep their piece text and are flagged, so pages can style them.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: printable stand-in character → byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_description(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is None:
        return ""
    try:
        state = decoder.__getstate__()
        return state.decode() if isinstance(state, bytes) else json.dumps(state)
    except Exception:  # noqa: BLE001 - any failure just means "unknown decoder"
        return type(decoder).__name__


def tokenizer_kind(tokenizer: Any) -> str:
    """'bytelevel', 'sentencepiece', 'wordpiece' or 'raw': how this tokenizer's pieces map to text."""
    desc = _decoder_description(tokenizer)
    if '"ByteLevel"' in desc or desc == "ByteLevel" or hasattr(tokenizer, "byte_decoder"):
        return "bytelevel"
    markers = ("Metaspace", "ByteFallback", "\u2581", "\\u2581")
    if any(m in desc for m in markers) or hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    if "WordPiece" in desc:
        return "wordpiece"
    return "raw"


@dataclass(slots=True)
class Token:
    """One rendered token: its display text (complete characters ending in this token), id, raw bytes, flags."""

    id: int
    text: str
    piece: str
    raw: bytes
    special: bool = False

    @property
    def partial(self) -> bool:
        """Holds only part of a multi-byte character (its text appears on a later token)."""
        return not self.special and self.text == "" and bool(self.raw)


class TokenRenderer:
    """Renders token ids of one tokenizer; per-id results are cached (cheap for 100k+ tokens)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.kind = tokenizer_kind(tokenizer)
        specials = set(getattr(tokenizer, "all_special_ids", None) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
        self.special_ids = specials
        self._cache: dict[int, tuple[str, bytes, bool]] = {}
        self._windows: dict[tuple[int, ...], list[Token]] = {}

    def piece(self, token_id: int) -> tuple[str, bytes, bool]:
        """(vocabulary piece, raw bytes, is special) of one id."""
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        piece = None
        try:
            piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        except (IndexError, KeyError, ValueError, OverflowError, TypeError):
            piece = None
        special = token_id in self.special_ids
        if piece is None:
            try:
                text = self.tokenizer.decode([int(token_id)])
            except Exception:  # noqa: BLE001 - ids outside the vocabulary
                text = ""
            piece = text or f"<id {token_id}>"
            result = (piece, text.encode("utf-8"), special or not text)
        elif special:
            result = (piece, piece.encode("utf-8"), True)
        else:
            result = (piece, self._bytes(piece), False)
        self._cache[token_id] = result
        return result

    def _bytes(self, piece: str) -> bytes:
        if self.kind == "bytelevel":
            table = byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode("utf-8")  # an added (non byte-level) token
        if self.kind == "sentencepiece":
            m = _BYTE_PIECE.match(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        if self.kind == "wordpiece":
            return (piece[2:] if piece.startswith("##") else " " + piece).encode("utf-8")
        return piece.encode("utf-8")

    def render(self, ids: Sequence[int]) -> list[Token]:
        """The tokens of one contiguous window, with multi-byte characters assigned to the token completing them."""
        key = tuple(int(i) for i in ids)
        hit = self._windows.get(key)
        if hit is None:
            if len(self._windows) > 50_000:
                self._windows.clear()
            hit = self._windows[key] = self._render(key)
        return list(hit)

    def _render(self, ids: Sequence[int]) -> list[Token]:
        out: list[Token] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def flush() -> None:
            rest = decoder.decode(b"", final=True)
            if rest and out:
                last = out[-1]
                out[-1] = Token(last.id, last.text + rest, last.piece, last.raw, last.special)
            decoder.reset()

        for token_id in ids:
            piece, raw, special = self.piece(int(token_id))
            if special:
                flush()
                out.append(Token(int(token_id), piece, piece, raw, True))
            else:
                out.append(Token(int(token_id), decoder.decode(raw), piece, raw, False))
        flush()
        return out

    def text(self, token_id: int) -> str:
        """A single token's text on its own (a lone partial byte shows as U+FFFD)."""
        return self.render([token_id])[0].text

    def label(self, token_id: int) -> str:
        """A single token's text on its own for lists and tables: its text when its bytes are valid UTF-8, else its
        bytes as `<0xE6><0x97>` (a fragment of a multi-byte character); special tokens as their piece."""
        piece, raw, special = self.piece(int(token_id))
        if special:
            return piece
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{b:02X}>" for b in raw)


_VISIBLE = {"\n": "\u21b5", "\r": "\u240d", "\t": "\u21e5", "\f": "\u240c", "\v": "\u240b"}


def display(text: str) -> str:
    """A token's text for inline display: newlines and tabs as visible symbols (↵ ⇥), other control characters as
    `\\xNN`; spaces kept (pages render tokens with `white-space: pre`)."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


__all__ = ["Token", "TokenRenderer", "byte_decoder", "display", "tokenizer_kind"]
