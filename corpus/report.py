"""Pictures of the corpus: what was kept (by genre and source) and what was dropped (by reason)."""

from __future__ import annotations

from collections import Counter

from corpus.storage import Storage


def plot_composition(storage: Storage, corpus_dir: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = storage.read_parquet([f"{corpus_dir}/docs.parquet"], columns=["source", "genre", "n_chars"])
    dropped = storage.read_parquet([f"{corpus_dir}/dropped.parquet"], columns=["reasons"])
    chars: Counter[str] = Counter()
    for source, genre, n in zip(docs["source"].to_pylist(), docs["genre"].to_pylist(), docs["n_chars"].to_pylist()):
        chars[f"{genre} / {source}"] += n
    reasons: Counter[str] = Counter(r for rs in dropped["reasons"].to_pylist() for r in rs)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=110)
    left.barh(list(chars), list(chars.values()), color="#3b7dd8")
    left.set_title(f"kept: {docs.num_rows} documents, {sum(chars.values()):,} characters")
    left.set_xlabel("characters (genre / source)")
    labels = ["kept"] + list(reasons)
    right.barh(labels, [docs.num_rows] + list(reasons.values()), color=["#3b7dd8"] + ["#d8613b"] * len(reasons))
    right.set_title("documents kept and dropped, by reason")
    right.set_xlabel("documents")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
