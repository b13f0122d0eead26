"""Pictures of the corpus: what was kept (by genre and source) and what was dropped (by reason)."""

from __future__ import annotations


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
