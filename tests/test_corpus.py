import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from corpus.extract import ExtractSettings, extract_html
from corpus.normalize import normalize, unicode_normal_form

STORY = (
    "みどり町の朝は、川霧がゆっくりと晴れていくところから始まります。"
    "商店街のパン屋さんは五時に火を入れ、焼きたての香りが通りに広がります。"
    "子どもたちは橋を渡って学校へ向かい、おじいさんたちは縁側でお茶を飲みながら天気の話をしています。"
    "昼になると役場の前の広場に人が集まり、季節の野菜を売る小さな市が開かれます。"
)


def test_normalize_folds_width_newlines_controls_and_spaces():
    assert normalize("ＡＢＣ\r\n１２３\x00\u3000\u3000x\ud800") == "ABC\n123 x"
    assert normalize("a\n\n\n\nb") == "a\n\nb"
    assert normalize("ｶﾞ", "none") == "ｶﾞ"


def test_extract_html_gets_main_text_title_and_lang():
    html = f"<html lang='ja'><head><title>町の朝</title></head><body><nav>トップ | ブログ</nav><article><p>{STORY}</p></article></body></html>"
    got = extract_html(html, "http://x.example/a", ExtractSettings())
    assert got["lang"] == "ja" and got["title"] == "町の朝" and "川霧" in got["text"]
    assert extract_html("<html><body><nav><a href='/'>トップ</a></nav></body></html>", "http://x/", ExtractSettings()) is None


def test_publication_dates_in_japanese_forms():
    from corpus.extract import japanese_date

    assert japanese_date("<html><body><footer>© 2026</footer><p>投稿日：2026年1月18日</p>") == "2026-01-18"
    assert japanese_date("<body><p>令和元年5月1日に改元</p>") == "2019-05-01"
    assert japanese_date("<body><p>平成31年4月30日</p>") == "2019-04-30"
    assert japanese_date("<body>更新 2024/3/9</body>") == "2024-03-09"
    assert japanese_date("<body>2024年13月40日、日付なし</body>") is None
    html = f"<html lang='ja'><body><article><p>2025年11月3日</p><p>{STORY}</p></article></body></html>"
    assert extract_html(html, "http://x.example/a", ExtractSettings())["published"] == "2025-11-03"


_NORMALIZATION_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("。\n、ａＡ１！（）ｶﾞﾊﾟ゛゜か\u3099\u309aは\u0301e\u0300\u0327가\u1100\u1161\u11a8①㈱㍻ﬁ\u00a0\u3000")),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=60,
)


@given(_NORMALIZATION_TEXT)
@settings(max_examples=600, deadline=None)
def test_sentence_wise_normal_forms_equal_unicodedata(text):
    for form in ("NFKC", "NFC"):
        assert unicode_normal_form(text, form) == unicodedata.normalize(form, text)
