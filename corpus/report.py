"""Reports on the corpus: what was kept (by genre and source), dropped (by reason), and how it grew.

``plot_composition`` draws one dedup link's running figures (its
``composition.png``). ``write_report`` writes the corpus report of the
pipeline: ``composition.json``/``.png`` (documents, characters and, once the
shards exist, tokens per genre and per source, with the mixture's shares before
and after weighting) and ``growth.json``/``.png`` (one row per dedup link).
"""

from __future__ import annotations

import io

from corpus.mixture import MixtureSettings, group_key, split_key
from corpus.storage import Storage


def plot_composition(figures: dict, png_path: str) -> None:
    """Draw the corpus figures of a dedup link (its ``corpus`` stats: the whole chain up to it).

    ``figures`` holds ``documents`` and ``characters`` kept, ``composition``
    (characters per ``"genre / source"``) and ``dropped`` (documents per reason).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chars: dict[str, int] = figures.get("composition", {})
    reasons: dict[str, int] = figures.get("dropped", {})
    kept = figures.get("documents", 0)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=110)
    left.barh(list(chars), list(chars.values()), color="#3b7dd8")
    left.set_title(f"kept: {kept} documents, {figures.get('characters', sum(chars.values())):,} characters")
    left.set_xlabel("characters (genre / source)")
    labels = ["kept"] + list(reasons)
    right.barh(labels, [kept] + list(reasons.values()), color=["#3b7dd8"] + ["#d8613b"] * len(reasons))
    right.set_title("documents kept and dropped, by reason")
    right.set_xlabel("documents")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


# -- the corpus report: composition and growth, tables and charts ---------------

REPORT_FILES = ("composition.json", "composition.png", "growth.json", "growth.png")


def link_counts(storage: Storage, docs_file: str, batch: int = 65536) -> dict[str, list[int]]:
    """Documents and characters per ``"genre / source"`` of one docs.parquet, streamed."""
    counts: dict[str, list[int]] = {}
    for b in storage.iter_parquet([docs_file], columns=["genre", "source", "n_chars"], batch_size=batch):
        for g, s, n in zip(*(b.column(i).to_pylist() for i in range(3))):
            c = counts.setdefault(group_key(g, s), [0, 0])
            c[0] += 1
            c[1] += int(n)
    return counts


def composition(groups: dict[str, list[int]], mixture: MixtureSettings, manifest: dict | None, corpus_id: str, links: int,
                shards_id: str | None = None) -> dict:
    """The composition report: documents, characters and (with shards) tokens per genre and per source.

    ``groups`` maps ``"genre / source"`` to ``[documents, characters]`` of the
    whole corpus. Shares are fractions of the corpus (or of the train split).
    ``mixed_share_characters`` is the expected share after weighting:
    ``weight × characters`` over the sum of it. With shards, the train tokens are
    measured from the manifest: ``train_tokens_natural`` counts every train
    document once, ``train_tokens`` the tokens written (copies included).
    """
    splits = (manifest or {}).get("splits", {})
    train = splits.get("train", {}).get("composition", {})
    val = splits.get("val", {}).get("composition", {})
    keys = sorted(set(groups) | set(train) | set(val))
    atoms = []
    for k in keys:
        genre, source = split_key(k)
        docs, chars = groups.get(k, [0, 0])
        atom = {"genre": genre, "source": source, "documents": docs, "characters": chars,
                "weight": mixture.weight(genre, source)}
        if manifest is not None:
            t, v = train.get(k, {}), val.get(k, {})
            atom.update(train_documents=t.get("documents", 0), train_tokens_natural=t.get("tokens", 0),
                        train_copies=t.get("written_documents", 0), train_tokens=t.get("written_tokens", 0),
                        val_documents=v.get("documents", 0), val_tokens=v.get("tokens", 0))
        atoms.append(atom)

    total_chars = sum(a["characters"] for a in atoms)
    total_mixed = sum(a["weight"] * a["characters"] for a in atoms)
    total_train_natural = sum(a.get("train_tokens_natural", 0) for a in atoms)
    total_train = sum(a.get("train_tokens", 0) for a in atoms)

    def share(x: float, total: float) -> float:
        return round(x / total, 6) if total else 0.0

    def row(name_field: str, name: str, members: list[dict]) -> dict:
        chars = sum(a["characters"] for a in members)
        mixed = sum(a["weight"] * a["characters"] for a in members)
        r = {name_field: name}
        if name_field == "source":
            r["genre"] = ", ".join(sorted({a["genre"] for a in members}))
        r.update(
            documents=sum(a["documents"] for a in members),
            characters=chars,
            share_characters=share(chars, total_chars),
            # a group's weight: its members' weights, averaged by characters
            weight=round(mixed / chars, 6) if chars else round(members[0]["weight"], 6),
            mixed_share_characters=share(mixed, total_mixed),
        )
        if manifest is not None:
            for f in ("train_documents", "train_copies", "train_tokens_natural", "train_tokens", "val_documents", "val_tokens"):
                r[f] = sum(a[f] for a in members)
            r["share_train_tokens_natural"] = share(r["train_tokens_natural"], total_train_natural)
            r["share_train_tokens"] = share(r["train_tokens"], total_train)
        return r

    def by(field: str) -> list[dict]:
        names = sorted({a[field] for a in atoms})
        return [row(field, n, [a for a in atoms if a[field] == n]) for n in names]

    totals = {"documents": sum(a["documents"] for a in atoms), "characters": total_chars}
    if manifest is not None:
        for f in ("train_documents", "train_copies"):
            totals[f] = sum(a[f] for a in atoms)
        totals.update(train_tokens_natural=total_train_natural, train_tokens=total_train,
                      val_documents=sum(a["val_documents"] for a in atoms), val_tokens=sum(a["val_tokens"] for a in atoms))
    return {
        "corpus": corpus_id,
        "links": links,
        "shards": shards_id,
        "tokenizer_id": (manifest or {}).get("tokenizer_id"),
        "mixture": mixture.model_dump(),
        "totals": totals,
        "by_genre": by("genre"),
        "by_source": by("source"),
    }


def growth(links: list[dict], counts: list[dict[str, list[int]]]) -> dict:
    """One row per dedup link, in chain order: what the link added and the corpus up to it.

    ``links`` carry ``id``, ``partition``, ``source``, ``run``, ``when`` and the
    link's ``stats``; ``counts`` are their :func:`link_counts`.
    """
    rows = []
    docs_by_genre: dict[str, int] = {}
    chars_by_genre: dict[str, int] = {}
    running_docs = running_chars = 0
    for i, (link, c) in enumerate(zip(links, counts), 1):
        s = link.get("stats", {})
        kept = sum(v[0] for v in c.values())
        chars = sum(v[1] for v in c.values())
        running_docs += kept
        running_chars += chars
        for k, (d, n) in c.items():
            genre = split_key(k)[0]
            docs_by_genre[genre] = docs_by_genre.get(genre, 0) + d
            chars_by_genre[genre] = chars_by_genre.get(genre, 0) + n
        rows.append({
            "link": i,
            "id": link["id"],
            "partition": link.get("partition"),
            "source": link.get("source", ""),
            "run": link.get("run", ""),
            "when": link.get("when", ""),
            "documents": s.get("documents", kept),
            "kept": kept,
            "exact_duplicates": s.get("exact_duplicates", 0),
            "near_duplicates": s.get("near_duplicates", 0),
            "characters": chars,
            "corpus_documents": running_docs,
            "corpus_characters": running_chars,
            "corpus_documents_by_genre": dict(sorted(docs_by_genre.items())),
            "corpus_characters_by_genre": dict(sorted(chars_by_genre.items())),
        })
    return {"corpus": links[-1]["id"] if links else None, "links": rows}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def composition_png(report: dict) -> bytes:
    """Shares per genre (natural and mixed; train tokens when there are shards), and characters per source."""
    plt = _pyplot()
    genres = report["by_genre"]
    tokens = report["shards"] is not None
    series = [("characters", "share_characters", "#3b7dd8"), ("characters, mixed (expected)", "mixed_share_characters", "#8fb8ee")]
    if tokens:
        series += [("train tokens, natural", "share_train_tokens_natural", "#d8613b"),
                   ("train tokens, as written", "share_train_tokens", "#f0a283")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 2.2 + 0.45 * max(len(genres), len(report["by_source"]), 3)), dpi=110)
    height = 0.8 / len(series)
    for j, (label, field, colour) in enumerate(series):
        ys = [i + (j - (len(series) - 1) / 2) * height for i in range(len(genres))]
        left.barh(ys, [100 * r[field] for r in genres], height=height, color=colour, label=label)
    left.set_yticks(range(len(genres)), [f"{r['genre']} (w {r['weight']:g})" for r in genres])
    left.invert_yaxis()
    left.set_xlabel("% of the corpus (tokens: % of the train split)")
    left.set_title("share by genre, before and after the mixture")
    left.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    sources = report["by_source"]
    right.barh([f"{r['source']} ({r['documents']} docs)" for r in sources], [r["characters"] for r in sources], color="#3b7dd8")
    right.invert_yaxis()
    totals = report["totals"]
    right.set_title(f"{totals['documents']:,} documents, {totals['characters']:,} characters in {report['links']} links")
    right.set_xlabel("characters by source")
    fig.tight_layout()
    return _png(fig)


def growth_png(report: dict) -> bytes:
    """The corpus link after link: characters by genre (stacked), and documents kept per link and in all."""
    plt = _pyplot()
    rows = report["links"]
    xs = [r["link"] for r in rows]
    genres = sorted({g for r in rows for g in r["corpus_characters_by_genre"]})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), dpi=110, sharex=True)
    base = [0] * len(rows)
    for g in genres:
        ys = [r["corpus_characters_by_genre"].get(g, 0) for r in rows]
        top.bar(xs, ys, bottom=base, label=g, width=0.8)
        base = [b + y for b, y in zip(base, ys)]
    top.set_ylabel("corpus characters")
    top.set_title("corpus growth, one dedup link per crawled partition (chronological)")
    if genres:
        top.legend(fontsize="small", loc="upper left")
    bottom.bar(xs, [r["kept"] for r in rows], color="#8fb8ee", label="kept by the link", width=0.8)
    bottom.plot(xs, [r["corpus_documents"] for r in rows], color="#3b7dd8", marker="o", label="corpus documents")
    bottom.set_ylabel("documents")
    bottom.set_xlabel("link" + (f" ({rows[0]['when'][:10] or rows[0]['run']} .. {rows[-1]['when'][:10] or rows[-1]['run']})" if rows else ""))
    bottom.legend(fontsize="small", loc="upper left")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


def write_report(storage: Storage, out: str, links: list[dict], mixture: MixtureSettings, manifest: dict | None = None,
                 shards_id: str | None = None) -> dict:
    """Write composition.json/.png and growth.json/.png of the corpus ``links`` (chain order) under ``out``."""
    counts = [link_counts(storage, f"{link['path']}/docs.parquet") for link in links]
    groups: dict[str, list[int]] = {}
    for c in counts:
        for k, (d, n) in c.items():
            g = groups.setdefault(k, [0, 0])
            g[0] += d
            g[1] += n
    comp = composition(groups, mixture, manifest, links[-1]["id"], len(links), shards_id)
    grow = growth(links, counts)
    storage.write_json(f"{out}/composition.json", comp)
    storage.write_json(f"{out}/growth.json", grow)
    storage.write_bytes(f"{out}/composition.png", composition_png(comp))
    storage.write_bytes(f"{out}/growth.png", growth_png(grow))
    stats = {"links": len(links), **comp["totals"], "files": list(REPORT_FILES)}
    return stats


def composition_table(report: dict) -> list[dict]:
    """The composition as one table (a Prefect table artifact): a row per genre, then per source, then the total."""
    rows = []
    for field in ("genre", "source"):
        for r in report[f"by_{field}"]:
            row = {"by": field, "name": r[field], **{k: v for k, v in r.items() if k not in ("genre", "source")}}
            rows.append(row)
    rows.append({"by": "total", "name": "corpus", **report["totals"]})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c, "") for c in columns} for r in rows]


def growth_markdown(report: dict, urls: dict[str, str], max_rows: int = 100) -> str:
    """The growth table as markdown (a Prefect markdown artifact), with where the charts and tables are."""
    rows = report["links"]
    lines = ["# jagpt corpus growth", ""]
    lines += ["Charts (artifacts cannot embed local images; open them from the storage root):", ""]
    lines += [f"- `{name}`: {url}" for name, url in urls.items()]
    lines += ["", "| link | partition | when | kept | exact dups | near dups | characters | corpus documents | corpus characters |",
              "|---|---|---|---|---|---|---|---|---|"]
    shown = rows[-max_rows:]
    for r in shown:
        lines.append(
            f"| {r['link']} | {r['partition'] or r['id']} | {r['when'] or '-'} | {r['kept']} | {r['exact_duplicates']} | "
            f"{r['near_duplicates']} | {r['characters']:,} | {r['corpus_documents']:,} | {r['corpus_characters']:,} |"
        )
    if len(shown) < len(rows):
        lines += ["", f"(the last {len(shown)} of {len(rows)} links; growth.json has them all)"]
    return "\n".join(lines)
