"""Decide a page's character encoding the way Japanese pages need.

Order: byte-order mark, HTTP header, ``<meta>``, then detection on the body.
A declared charset is only believed after a cross-check:

* a body that is valid UTF-8 and not plain ASCII is UTF-8, whatever it
  declares (legacy Japanese text is practically never valid UTF-8, while
  UTF-8 Japanese often decodes "cleanly" as cp932 into mojibake);
* any other declared charset must decode the body strictly, and must not
  read as mojibake when a Japanese charset reads it as Japanese.

The Shift_JIS family is decoded as cp932, which also knows ① ㈱ 髙, and
EUC-JP as EUC-JIS-2004, its superset.
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
    "euc_jp": "euc_jis_2004",
    "iso-2022-jp": "iso2022_jp_ext",
    "csiso2022jp": "iso2022_jp_ext",
    "utf8": "utf-8",
}
_META = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.I)
_BOMS = [(codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
_ISO2022_ESCAPES = (b"\x1b$B", b"\x1b$@", b"\x1b(J", b"\x1b(I", b"\x1b$(D")
_JAPANESE_CODECS = ("cp932", "euc_jis_2004")

# What Japanese pages are made of, beyond ASCII: kana, kanji, CJK and
# full-width punctuation, and the symbols Japanese typesetting uses.
_JAPANESE_CHAR = re.compile(
    "[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff01-\uff60\uffe0-\uffee"
    "\u2010-\u206f\u2100-\u27bf\u3200-\u33ff\u00a0-\u00bf\u00d7\u00f7]"
)
_KANA = re.compile("[\u3041-\u309f\u30a0-\u30ff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


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
    return m.group(1).strip("\"'") if m else None


def meta_charset(body: bytes) -> str | None:
    m = _META.search(body[:4096])
    return m.group(1).decode("ascii", "replace") if m else None


def declared(body: bytes, content_type: str | None) -> str:
    """What the page says about itself, e.g. ``header=utf-8;meta=Shift_JIS`` (for the record)."""
    parts = [f"{where}={label}" for where, label in (("header", header_charset(content_type)), ("meta", meta_charset(body))) if label]
    return ";".join(parts)


def looks_binary(body: bytes) -> bool:
    """Bytes no HTML page is made of: NULs or many control bytes (UTF-16 has a BOM and is handled first)."""
    head = body[:8192]
    if not head or any(head.startswith(bom) for bom, _ in _BOMS):
        return False
    if b"\x00" in head:
        return True
    controls = sum(head.count(bytes([c])) for c in (*range(1, 9), 11, 12, *range(14, 27), *range(28, 32)))
    return controls > len(head) // 100


def japanese_score(text: str) -> float:
    """Share of the non-ASCII characters that Japanese text is made of (1.0 for ASCII-only text).

    Mojibake scores low: EUC-JP read as cp932 turns into half-width katakana,
    and any Japanese read as Latin-1 into accented letters and C1 controls.
    """
    non_ascii = len(text) - len(text.encode("ascii", "ignore"))
    if non_ascii == 0:
        return 1.0
    return len(_JAPANESE_CHAR.findall(text)) / non_ascii


def _decode(body: bytes, encoding: str) -> str | None:
    try:
        return body.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _convincing_japanese(body: bytes) -> str | None:
    """The Japanese codec under which ``body`` reads as Japanese prose, if any.

    Kana is the tell: Korean in EUC-KR or French in Latin-1 may decode as
    EUC-JP or cp932 into plausible-looking kanji, but never into kana.
    """
    for enc in _JAPANESE_CODECS:
        text = _decode(body, enc)
        if text is None:
            continue
        non_ascii = len(text) - len(text.encode("ascii", "ignore"))
        if japanese_score(text) >= 0.9 and len(_KANA.findall(text)) >= 0.1 * non_ascii:
            return enc
    return None


def decide(body: bytes, content_type: str | None) -> tuple[str, str]:
    """Return ``(python_codec, where_it_came_from)`` for ``body``.

    ``where`` is one of bom, header, meta, detected, fallback. ``fallback``
    means nothing decoded cleanly; the caller must count that page as a decode
    failure rather than store mojibake.
    """
    for bom, enc in _BOMS:
        if body.startswith(bom):
            return enc, "bom"
    clues = [(where, canonical(label)) for where, label in (("header", header_charset(content_type)), ("meta", meta_charset(body))) if label]
    clues = [(where, enc) for where, enc in clues if enc]

    if body.isascii():
        if any(esc in body for esc in _ISO2022_ESCAPES):
            return "iso2022_jp_ext", next((w for w, e in clues if e.startswith("iso2022_jp")), "detected")
        return next(((e, w) for w, e in clues if _decode(body, e) is not None), ("utf-8", "detected"))

    if _decode(body, "utf-8") is not None:
        return "utf-8", next((w for w, e in clues if e == "utf-8"), "detected")

    japanese = _convincing_japanese(body)
    for where, enc in clues:
        text = _decode(body, enc)
        if text is not None and (enc == japanese or japanese is None or japanese_score(text) >= 0.5):
            return enc, where
    if japanese is not None:
        return japanese, "detected"
    best = charset_normalizer.from_bytes(body).best()
    if best is not None:
        enc = canonical(best.encoding) or best.encoding
        text = _decode(body, enc)
        if text is not None and not _CONTROL.search(text[:4096]):
            return enc, "detected"
    return "utf-8", "fallback"
