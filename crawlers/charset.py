"""Decide a page's character encoding the way Japanese pages need.

Order: byte-order mark, HTTP header, ``<meta>``, then detection on the body.
A declared charset is trusted only if the body decodes under it; otherwise the
next clue is tried, so a page that says UTF-8 but is Shift_JIS still comes out
right. The Shift_JIS family is decoded as cp932, which also knows ① ㈱ 髙.
"""

from __future__ import annotations

import codecs
import re

import charset_normalizer

_ALIASES = {
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "csshiftjis": "cp932",
    "windows-31j": "cp932",
    "cp932": "cp932",
    "euc-jp": "euc_jis_2004",
    "x-euc-jp": "euc_jis_2004",
    "eucjp": "euc_jis_2004",
    "iso-2022-jp": "iso2022_jp_ext",
    "csiso2022jp": "iso2022_jp_ext",
    "utf8": "utf-8",
}
_META = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.I)
_BOMS = [(codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]


def canonical(name: str) -> str | None:
    """The Python codec for a charset label, or None if Python does not know it."""
    label = name.strip().strip("\"'").lower()
    label = _ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def header_charset(content_type: str | None) -> str | None:
    if not content_type:
        return None
    m = re.search(r"charset\s*=\s*([^\s;]+)", content_type, re.I)
    return m.group(1) if m else None


def _decodes(body: bytes, encoding: str) -> bool:
    try:
        body.decode(encoding)
        return True
    except (UnicodeDecodeError, LookupError):
        return False


def decide(body: bytes, content_type: str | None) -> tuple[str, str]:
    """Return ``(python_codec, where_it_came_from)`` for ``body``.

    ``where`` is one of bom, header, meta, detected, fallback. ``fallback``
    means nothing decoded cleanly; the caller must count that page as a decode
    failure rather than store mojibake.
    """
    for bom, enc in _BOMS:
        if body.startswith(bom):
            return enc, "bom"
    clues = [("header", header_charset(content_type))]
    m = _META.search(body[:4096])
    clues.append(("meta", m.group(1).decode("ascii", "replace") if m else None))
    for where, label in clues:
        enc = canonical(label) if label else None
        if enc and _decodes(body, enc):
            return enc, where
    best = charset_normalizer.from_bytes(body).best()
    if best is not None:
        enc = canonical(best.encoding) or best.encoding
        if _decodes(body, enc):
            return enc, "detected"
    return "utf-8", "fallback"
