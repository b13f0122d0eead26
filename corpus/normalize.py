"""Text normalization, done once in the corpus stage (the encoder itself is lossless)."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

NormalForm = Literal["NFKC", "NFC", "none"]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str, form: NormalForm = "NFKC") -> str:
    """Unify newlines, apply a Unicode normal form, drop control characters and
    lone surrogates (left by broken decoders), fold runs of spaces, trim lines."""
    text = _SURROGATE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
