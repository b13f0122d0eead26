"""The corpus mixture (weights per genre and source) and the corpus report (composition and growth).

Real data, no mocks: documents are the sample site's novel and news
paragraphs, tokenized by a real BPE encoder and written by the real shards,
dedup and report code.
"""

import glob
import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from corpus.mixture import MixtureSettings
from corpus.schema import DOC, DROPPED
from corpus.steps import run_step
from corpus.storage import Storage
from encoder.bpe import EncoderSettings, train
from encoder.shards import ShardSettings, build_shards, is_val, load_split
from flows import stages
from flows.config import Config, ConfigError, parse_config

T0 = datetime(2026, 1, 5, tzinfo=timezone.utc)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def paragraphs(genre_dir: str) -> list[str]:
    site = os.path.join(os.path.dirname(stages.__file__), "..", "crawlers", "sample-site", genre_dir)
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(site, "*.html"))):
        if "update" in path:  # the sample site's planted near duplicate
            continue
        with open(path, encoding="utf-8") as f:
            for p in re.findall(r"<p>([^<]{40,})</p>", f.read()):
                if p not in seen:
                    seen.add(p)
                    out.append(p)
    return out


NOVEL = paragraphs("novel")
NEWS = paragraphs("news")


def doc_row(text: str, source: str, genre: str, i: int = 0) -> dict:
    return {
        "doc_id": hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], "url": f"http://{source}.example/{i}",
        "source": source, "genre": genre, "fetched_at": T0 + timedelta(minutes=i), "title": "", "text": text,
        "n_chars": len(text), "hiragana_ratio": 0.5, "japanese_ratio": 1.0, "katakana_ratio": 0.0, "dup_cluster": None,
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two docs.parquet files (as two dedup links leave them): novel paragraphs from source a, news from b."""
    storage = Storage(str(tmp_path_factory.mktemp("mix")))
    storage.write_parquet("c1/docs.parquet", pa.Table.from_pylist([doc_row(t, "a", "novel", i) for i, t in enumerate(NOVEL)], schema=DOC))
    storage.write_parquet("c2/docs.parquet", pa.Table.from_pylist([doc_row(t, "b", "news", i) for i, t in enumerate(NEWS)], schema=DOC))
    encoder = train(NOVEL + NEWS, EncoderSettings(vocab_size=500), "tok-mix")
    return storage, ["c1/docs.parquet", "c2/docs.parquet"], encoder


SHARDS = ShardSettings(shard_tokens=700, val_fraction=0.15, batch_docs=16)


def shard_bytes(storage: Storage, out: str, split: str) -> list[bytes]:
    manifest = storage.read_json(f"{out}/manifest.json")
    return [storage.read_bytes(f"{out}/{s['path']}") for s in manifest["splits"][split]["shards"]]


def test_weights_2_to_1_double_the_novel_train_tokens_and_leave_val_alone(corpus):
    storage, files, encoder = corpus
    assert len(NOVEL) >= 50 and len(NEWS) >= 30
    natural = build_shards(storage, files, encoder, SHARDS, "natural", "corpus/x")
    mixed = build_shards(storage, files, encoder, SHARDS, "mixed", "corpus/x", MixtureSettings(genres={"novel": 2, "news": 1}))
    nat, mix = natural["splits"]["train"]["composition"], mixed["splits"]["train"]["composition"]
    assert set(nat) == set(mix) == {"novel / a", "news / b"}
    # The same train documents, the same natural tokens; only what is written differs.
    assert all(mix[k]["documents"] == nat[k]["documents"] and mix[k]["tokens"] == nat[k]["tokens"] for k in nat)
    # Every novel train document is written twice, every news one once: the documented rule, exactly.
    assert mix["novel / a"]["written_tokens"] == 2 * nat["novel / a"]["tokens"]
    assert mix["novel / a"]["written_documents"] == 2 * nat["novel / a"]["documents"]
    assert mix["news / b"]["written_tokens"] == nat["news / b"]["tokens"]
    # So the novel share of train tokens is proportional to weight x natural share.
    share = lambda c, k: c[k]["written_tokens"] / sum(v["written_tokens"] for v in c.values())  # noqa: E731
    natural_ratio = share(nat, "novel / a") / share(nat, "news / b")
    assert share(mix, "novel / a") / share(mix, "news / b") == pytest.approx(2 * natural_ratio, rel=1e-12)
    assert mixed["splits"]["train"]["tokens"] == sum(v["written_tokens"] for v in mix.values())
    tokens = load_split(storage, "mixed", "train")
    assert len(tokens) == mixed["splits"]["train"]["tokens"] and (tokens == encoder.eot_id).sum() == mixed["splits"]["train"]["documents"]
    # Val keeps its natural documents, byte for byte.
    assert shard_bytes(storage, "mixed", "val") == shard_bytes(storage, "natural", "val")
    assert mixed["splits"]["val"]["composition"] == natural["splits"]["val"]["composition"]
    assert mixed["mixture"]["genres"] == {"novel": 2.0, "news": 1.0}


def test_same_inputs_give_byte_identical_shards(corpus, tmp_path):
    storage, files, encoder = corpus
    mixture = MixtureSettings(genres={"novel": 1.5}, sources={"b": 0.5}, seed=3)
    first = build_shards(storage, files, encoder, SHARDS, "again-1", "corpus/x", mixture)
    # Another storage, another batch size: the same bytes.
    other = Storage(str(tmp_path))
    for f in files:
        other.write_bytes(f, storage.read_bytes(f))
    second = build_shards(other, files, encoder, SHARDS.model_copy(update={"batch_docs": 5}), "again-2", "corpus/x", mixture)
    for split in ("train", "val"):
        assert shard_bytes(storage, "again-1", split) == shard_bytes(other, "again-2", split)
        assert [s["sha256"] for s in first["splits"][split]["shards"]] == [s["sha256"] for s in second["splits"][split]["shards"]]


def test_fractional_weights_keep_a_fixed_seeded_subset(corpus):
    storage, files, encoder = corpus
    half = MixtureSettings(sources={"a": 0.5})
    manifest = build_shards(storage, files, encoder, SHARDS, "half", "corpus/x", half)
    novel = manifest["splits"]["train"]["composition"]["novel / a"]
    n = novel["documents"]
    # Each novel document is kept when its seeded draw is below 0.5: the count is the draws below 0.5.
    ids = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in NOVEL]
    train_ids = [d for d in ids if not is_val(d, SHARDS.val_fraction)]
    assert len(train_ids) == n
    assert novel["written_documents"] == sum(half.draw(d) < 0.5 for d in train_ids)
    assert abs(novel["written_documents"] - n / 2) <= 3 * (n / 4) ** 0.5  # a fair coin, in effect
    assert manifest["splits"]["train"]["composition"]["news / b"]["written_documents"] == manifest["splits"]["train"]["composition"]["news / b"]["documents"]
    # Another seed keeps another subset.
    other = MixtureSettings(sources={"a": 0.5}, seed=1)
    assert [half.copies(d, "novel", "a") for d in train_ids] != [other.copies(d, "novel", "a") for d in train_ids]
    # 1.5: every document once, and the same kind of half twice; 0: never; the cap bounds the product.
    w = MixtureSettings(genres={"novel": 1.5})
    assert {w.copies(d, "novel", "a") for d in train_ids} == {1, 2}
    assert MixtureSettings(genres={"novel": 0}).copies(train_ids[0], "novel", "a") == 0
    capped = MixtureSettings(genres={"novel": 3}, sources={"a": 3}, max_copies=4)
    assert capped.weight("novel", "a") == 4 and capped.copies(train_ids[0], "novel", "a") == 4


def test_a_mixture_that_empties_the_train_split_is_an_error(corpus):
    storage, files, encoder = corpus
    with pytest.raises(ValueError, match="leaves the train split empty"):
        build_shards(storage, files, encoder, SHARDS, "empty", "corpus/x", MixtureSettings(genres={"novel": 0, "news": 0}))


# -- config ----------------------------------------------------------------------

BASE = (
    "sources:\n"
    "  - name: aozora-bunko\n    genre: novel\n    start_urls: ['http://a.example/']\n"
    "  - name: wikinews\n    genre: news\n    start_urls: ['http://b.example/']\n"
)


def test_a_valid_mixture_is_read_and_the_default_is_natural():
    cfg = parse_config(BASE + "mixture:\n  genres: {novel: 2.0, news: 1}\n  sources: {aozora-bunko: 0.5}\n")
    assert cfg.mixture.weight("novel", "aozora-bunko") == 1.0 and cfg.mixture.weight("news", "wikinews") == 1.0
    assert cfg.mixture.weight("blog", "x") == 1.0 and not cfg.mixture.is_natural()
    assert parse_config(BASE).mixture.is_natural() and parse_config(BASE + "mixture: {genres: {novel: 1}}").mixture.is_natural()


@pytest.mark.parametrize(
    "mixture, field, says",
    [
        ("{genres: {novel: -1}}", "mixture.genres.novel", "greater than or equal to 0"),
        ("{sources: {wikinews: -0.5}}", "mixture.sources.wikinews", "greater than or equal to 0"),
        ("{genres: {poetry: 2}}", "mixture.genres.poetry", "Input should be 'blog'"),
        ("{sources: {aozora: 2}}", "mixture.sources.aozora", "no source named 'aozora' in sources (they are: aozora-bunko, wikinews)"),
        ("{genre: {novel: 2}}", "mixture.genre", "Extra inputs are not permitted"),
        ("{genres: {novel: .inf}}", "mixture.genres.novel", "finite number"),
        ("{genres: {novel: lots}}", "mixture.genres.novel", "valid number"),
        ("{genres: {novel: 5}}", "mixture.genres.novel", "above max_copies (4)"),
        ("{max_copies: 0}", "mixture.max_copies", "greater than or equal to 1"),
    ],
)
def test_invalid_mixtures_name_the_field(mixture, field, says):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + f"mixture: {mixture}\n", "mix.yaml")
    msg = str(e.value)
    assert "invalid config (mix.yaml)" in msg and f"  {field}" in msg and says in msg, msg


def test_a_higher_cap_allows_a_higher_weight():
    assert parse_config(BASE + "mixture: {genres: {novel: 5}, max_copies: 8}").mixture.weight("novel", "x") == 5


# -- the stages: step keys, the encoder's texts, the report ------------------------


def _config(root, mixture: dict | None = None) -> Config:
    return Config.model_validate(
        {
            "storage": {"root": str(root)},
            "sources": [
                {"name": "a", "genre": "novel", "start_urls": ["http://a.example/"]},
                {"name": "b", "genre": "news", "start_urls": ["http://b.example/"]},
            ],
            "mixture": mixture or {},
            "encoder": {"vocab_size": 400},
            "shards": {"shard_tokens": 512, "val_fraction": 0.2},
        }
    )


# The known corpus: three partitions, in chain order.
WEEK1_A = NOVEL[:10]
WEEK2_B = NEWS[:6] + [NOVEL[0]]  # the last one is an exact copy of a week-1 document
WEEK3_A = NOVEL[10:14]
PARTITIONS = [
    ("a", "novel", "20260105T000000Z-aaaaaa", WEEK1_A),
    ("b", "news", "20260112T000000Z-bbbbbb", WEEK2_B),
    ("a", "novel", "20260119T000000Z-aaaaaa", WEEK3_A),
]


def _clean_steps(storage: Storage) -> list:
    """Extract and clean steps as the stages leave them (real steps, with markers), one per partition."""
    cleaned = []
    for source, genre, run, texts in PARTITIONS:
        partition = f"raw/source={source}/run={run}"
        extracted = run_step(storage, "extract", 2, {"raw": partition}, {}, lambda out: {"pages": len(texts)})
        rows = [doc_row(t, source, genre, i) for i, t in enumerate(texts)]

        def write(out: str, rows=rows) -> dict:
            storage.write_parquet(f"{out}/docs.parquet", pa.Table.from_pylist(sorted(rows, key=lambda r: r["doc_id"]), schema=DOC))
            storage.write_parquet(f"{out}/dropped.parquet", DROPPED.empty_table())
            return {"documents": len(rows), "kept": len(rows)}

        cleaned.append(run_step(storage, "corpus/clean", 1, {"extracted": extracted.id}, {}, write))
    return cleaned


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("report"), {"genres": {"novel": 2}})
    storage = cfg.storage_root()
    links = stages.dedup_chain(storage, cfg, _clean_steps(storage))
    tokenizer = stages.encoder_step(storage, cfg, links)
    shards = stages.shards_step(storage, cfg, tokenizer, links)
    report = stages.report_step(storage, cfg, links, shards)
    return cfg, links, tokenizer, shards, report


def test_the_mixture_is_in_the_encoder_and_shards_keys(built):
    cfg, links, tokenizer, shards, _ = built
    storage = cfg.storage_root()
    assert storage.marker(tokenizer.path)["settings"]["mixture"]["genres"] == {"novel": 2.0}
    assert storage.marker(shards.path)["settings"]["mixture"]["genres"] == {"novel": 2.0}
    again = _config(cfg.storage.root, {"genres": {"novel": 2.0, "news": 1.0}})  # a weight of 1 changes nothing
    tok2 = stages.encoder_step(storage, again, links)
    assert tok2.cached and tok2.id == tokenizer.id
    assert stages.shards_step(storage, again, tok2, links).id == shards.id
    natural = _config(cfg.storage.root)
    assert stages.encoder_step(storage, natural, links).id != tokenizer.id


def test_the_encoder_trains_on_the_weighted_texts(built):
    cfg, links, tokenizer, _, _ = built
    storage = cfg.storage_root()
    natural = list(stages.corpus_texts(storage, links))
    mixed = list(stages.mixed_texts(storage, links, cfg.mixture))
    kept_novel = [t for t in natural if t in NOVEL]
    assert len(mixed) == len(natural) + len(kept_novel)
    assert sorted(mixed) == sorted(natural + kept_novel)
    # The encoder's report measures the same weighted stream.
    assert tokenizer.stats["tokens"] == sum(len(ids) for ids in stages.load_encoder(storage, tokenizer.key).encode_batch(mixed))


def test_composition_report_has_the_known_figures(built):
    cfg, links, _, shards, report = built
    storage = cfg.storage_root()
    assert sorted(storage.listdir(report.path)) == ["_SUCCESS.json", "composition.json", "composition.png", "growth.json", "growth.png"]
    assert report.path.startswith("reports/")
    comp = storage.read_json(f"{report.path}/composition.json")
    novel_chars = sum(len(t) for t in WEEK1_A + WEEK3_A)
    news_chars = sum(len(t) for t in NEWS[:6])
    assert comp["corpus"] == links[-1].id and comp["links"] == 3 and comp["shards"] == shards.id
    assert comp["totals"]["documents"] == 20 and comp["totals"]["characters"] == novel_chars + news_chars
    by_genre = {r["genre"]: r for r in comp["by_genre"]}
    assert by_genre["novel"]["documents"] == 14 and by_genre["novel"]["characters"] == novel_chars
    assert by_genre["news"]["documents"] == 6 and by_genre["news"]["characters"] == news_chars
    assert by_genre["novel"]["weight"] == 2 and by_genre["news"]["weight"] == 1
    # Effective shares before and after weighting.
    total = novel_chars + news_chars
    assert by_genre["novel"]["share_characters"] == round(novel_chars / total, 6)
    assert by_genre["novel"]["mixed_share_characters"] == round(2 * novel_chars / (2 * novel_chars + news_chars), 6)
    # Tokens from the shards: novel train documents were written twice.
    manifest = storage.read_json(f"{shards.path}/manifest.json")
    assert by_genre["novel"]["train_tokens"] == 2 * by_genre["novel"]["train_tokens_natural"] > 0
    assert by_genre["news"]["train_tokens"] == by_genre["news"]["train_tokens_natural"]
    assert comp["totals"]["train_tokens"] == manifest["splits"]["train"]["tokens"]
    assert comp["totals"]["val_tokens"] == manifest["splits"]["val"]["tokens"]
    assert by_genre["novel"]["train_documents"] + by_genre["novel"]["val_documents"] == 14
    by_source = {r["source"]: r for r in comp["by_source"]}
    assert by_source["a"]["genre"] == "novel" and by_source["a"]["documents"] == 14 and by_source["b"]["documents"] == 6
    # The table artifact: a row per genre, per source, and the total.
    table, markdown = stages.report_artifacts(storage, report)
    assert [(r["by"], r["name"]) for r in table] == [("genre", "news"), ("genre", "novel"), ("source", "a"), ("source", "b"), ("total", "corpus")]
    assert len({tuple(r) for r in table}) == 1  # the same columns in every row
    assert storage.url(f"{report.path}/growth.png") in markdown and storage.url(f"{report.path}/composition.png") in markdown


def test_growth_report_has_one_row_per_link(built):
    cfg, links, _, _, report = built
    storage = cfg.storage_root()
    rows = storage.read_json(f"{report.path}/growth.json")["links"]
    assert [r["id"] for r in rows] == [link.id for link in links]
    assert [r["partition"] for r in rows] == [f"raw/source={s}/run={r}" for s, _, r, _ in PARTITIONS]
    assert [r["when"] for r in rows] == ["2026-01-05T00:00:00Z", "2026-01-12T00:00:00Z", "2026-01-19T00:00:00Z"]
    assert [r["kept"] for r in rows] == [10, 6, 4] and [r["exact_duplicates"] for r in rows] == [0, 1, 0]
    assert [r["corpus_documents"] for r in rows] == [10, 16, 20]
    assert rows[-1]["corpus_documents_by_genre"] == {"news": 6, "novel": 14}
    # The running totals agree with the dedup links' own.
    assert [r["corpus_characters"] for r in rows] == [link.stats["corpus"]["characters"] for link in links]
    _, markdown = stages.report_artifacts(storage, report)
    assert markdown.count("| raw/source=") == 3


def test_report_charts_are_pngs_and_a_rerun_is_a_no_op(built):
    cfg, links, _, shards, report = built
    storage = cfg.storage_root()
    for name in ("composition.png", "growth.png"):
        data = storage.read_bytes(f"{report.path}/{name}")
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    again = stages.report_step(storage, cfg, links, shards)
    assert again.cached and again.id == report.id
    # Without shards (a run stopped before them): characters only, another key.
    early = stages.report_step(storage, cfg, links)
    assert early.id != report.id
    comp = storage.read_json(f"{early.path}/composition.json")
    assert comp["shards"] is None and "train_tokens" not in comp["by_genre"][0]
    assert storage.read_bytes(f"{early.path}/composition.png").startswith(PNG_MAGIC)


def test_corpus_report_reads_a_gcs_root(gcs_root):
    root, options = gcs_root
    cfg = _config(root)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"options": options})})
    storage = cfg.storage_root()
    links = stages.dedup_chain(storage, cfg, _clean_steps(storage))
    report = stages.report_step(storage, cfg, links)
    grow = json.loads(storage.read_bytes(f"{report.path}/growth.json"))
    assert len(grow["links"]) == 3 and storage.read_bytes(f"{report.path}/growth.png").startswith(PNG_MAGIC)
    assert np.array_equal([r["corpus_documents"] for r in grow["links"]], [10, 16, 20])
