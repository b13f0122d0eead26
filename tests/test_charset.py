import pytest

from crawlers.charset import canonical, decide

PROSE = "株式会社①の髙橋です。今日は良い天気ですね。ひらがなとカタカナと漢字が混ざった文章です。" * 3


PLAIN = "今日は良い天気ですね。ひらがなとカタカナと漢字が混ざった文章を書いています。" * 3


def page(meta: str = "", prose: str = PROSE) -> str:
    return f"<html><head>{meta}<title>テスト</title></head><body><p>{prose}</p></body></html>"


def test_shift_jis_without_any_declaration_is_detected_as_cp932():
    body = page().encode("cp932")
    enc, where = decide(body, "text/html")
    assert (enc, where) == ("cp932", "detected")
    assert PROSE in body.decode(enc)


def test_meta_only_shift_jis_uses_cp932_for_cp932_only_characters():
    body = page('<meta charset="Shift_JIS">').encode("cp932")
    assert decide(body, "text/html") == ("cp932", "meta")


def test_wrong_header_charset_falls_through_to_the_truth():
    body = page('<meta charset="EUC-JP">', PLAIN).encode("euc_jp")
    enc, where = decide(body, "text/html; charset=utf-8")
    assert where == "meta" and PLAIN in body.decode(enc)


def test_header_and_bom():
    assert decide(page().encode("utf-8"), "text/html; charset=UTF-8") == ("utf-8", "header")
    assert decide(b"\xef\xbb\xbf" + page().encode("utf-8"), None) == ("utf-8-sig", "bom")


@pytest.mark.parametrize("label,codec", [("Shift_JIS", "cp932"), ("x-sjis", "cp932"), ("EUC-JP", "euc_jis_2004"), ("nonsense", None)])
def test_canonical_names(label, codec):
    assert canonical(label) == codec
