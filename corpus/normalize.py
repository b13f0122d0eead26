"""Text normalization, done once in the corpus stage (the encoder itself is lossless).

Optionally, the seed encoder's content tags replace things a language model
should not memorize verbatim: URLs, e-mail addresses, phone numbers, dates and
prices become ``<URL>`` ``<EMAIL>`` ``<TEL>`` ``<DATE>`` ``<PRICE>``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

NormalForm = Literal["NFKC", "NFC", "none"]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")

# Applied after NFKC, so digits and symbols are already half-width. Order
# matters: an e-mail contains what looks like a domain, a URL may contain digits.
CONTENT_TAGS: list[tuple[str, re.Pattern[str]]] = [
    ("<URL>", re.compile(r"https?://[^\s<>\"'「」『』（）()]+|www\.[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s<>\"'「」『』（）()]*")),
    ("<EMAIL>", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")),
    ("<TEL>", re.compile(r"(?<!\d)(?:0\d{1,4}-\d{1,4}-\d{3,4}|\(0\d{1,4}\)\d{1,4}-\d{3,4}|0[5789]0\d{8})(?!\d)")),
    ("<DATE>", re.compile(
        r"(?:(?:\d{4}|令和|平成|昭和)(?:\d{1,2}|元)?年\d{1,2}月\d{1,2}日|\d{4}[/-]\d{1,2}[/-]\d{1,2}(?!\d))"
    )),
    ("<PRICE>", re.compile(r"(?:[¥$]\s?\d[\d,]*(?:\.\d+)?|\d[\d,]*(?:\.\d+)?\s?(?:円|万円|億円|ドル))")),
]


def tag_content(text: str) -> str:
    for tag, pattern in CONTENT_TAGS:
        text = pattern.sub(tag, text)
    return text


def unicode_normal_form(text: str, form: Literal["NFKC", "NFC"]) -> str:
    """``unicodedata.normalize(form, text)``, computed only on the sentences that need it.

    Most Japanese sentences are already normalized, and checking is some 100×
    cheaper than normalizing. Splitting at 。 and newlines is exact: both are
    their own normal form, never reorder, and never compose with a neighbour.
    """
    if unicodedata.is_normalized(form, text):
        return text
    return "\n".join(
        line if unicodedata.is_normalized(form, line) else "。".join(
            s if unicodedata.is_normalized(form, s) else unicodedata.normalize(form, s) for s in line.split("。")
        )
        for line in text.split("\n")
    )


def normalize(text: str, form: NormalForm = "NFKC", content_tags: bool = False) -> str:
    """Unify newlines, apply a Unicode normal form, drop control characters and
    lone surrogates (left by broken decoders), fold runs of spaces, trim lines,
    and optionally replace URLs, e-mails, phone numbers, dates and prices by tags."""
    text = _SURROGATE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if form != "none":
        text = unicode_normal_form(text, form)
    text = _CONTROL.sub("", text)
    if content_tags:
        text = tag_content(text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
