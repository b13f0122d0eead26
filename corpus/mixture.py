"""The corpus mixture: how much of each genre and source the encoder and the shards' train split see.

A weight is a relative sampling weight per character (so, roughly, per token).
A document's weight ``w`` is its genre's weight times its source's weight
(1.0 for any genre or source not named), capped at ``max_copies``. The train
split holds ``floor(w)`` copies of the document, plus one more when a seeded
hash of its ``doc_id`` falls below the fractional part of ``w``:

* ``w = 2`` writes every document twice, ``w = 1`` once, ``w = 0`` never;
* ``w = 0.5`` keeps a fixed half of the documents (the same half on every run);
* ``w = 1.5`` writes every document once and a fixed half of them twice.

So a genre's expected train tokens are ``w`` times its natural train tokens,
and its share of the train split is proportional to ``w`` times its natural
share (exactly so for integer weights). The val split is never weighted: it
keeps the natural distribution of the held-out documents, so validation losses
stay comparable when the mixture changes. The encoder trains on the same
weighted stream (every document, with its copies), cut at its
``sample_chars``.

The decision depends only on ``(doc_id, genre, source)`` and these settings,
so it streams (one document at a time) and the same inputs give the same
shards, byte for byte. The default, no weights, is the natural mixture.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from corpus.settings import Settings
from crawlers.config import Genre

Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
SourceName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]


class MixtureSettings(Settings):
    """``mixture`` in the config: relative sampling weights per genre and per source (default: natural)."""

    # e.g. {novel: 2.0, news: 1.0}; a genre not named has weight 1.
    genres: dict[Genre, Weight] = {}
    # e.g. {aozora-bunko: 0.5}; must name a source of the config. Multiplies the genre's weight.
    sources: dict[SourceName, Weight] = {}
    max_copies: int = Field(default=4, ge=1, le=100, description="most copies of one document in the train split")
    seed: int = Field(default=0, description="seeds the hash that picks which documents a fractional weight keeps")

    @model_validator(mode="after")
    def _weights_within_cap(self) -> MixtureSettings:
        errors = [
            InitErrorDetails(
                type=PydanticCustomError(
                    "weight_above_cap",
                    "weight {weight} is above max_copies ({cap}); raise mixture.max_copies to allow it",
                    {"weight": w, "cap": self.max_copies},
                ),
                loc=(kind, name),
                input=w,
            )
            for kind, table in (("genres", self.genres), ("sources", self.sources))
            for name, w in table.items()
            if w > self.max_copies
        ]
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def is_natural(self) -> bool:
        return all(w == 1 for w in (*self.genres.values(), *self.sources.values()))

    def weight(self, genre: str, source: str) -> float:
        """The effective weight of a document of ``genre`` from ``source``."""
        return min(self.genres.get(genre, 1.0) * self.sources.get(source, 1.0), float(self.max_copies))

    def copies(self, doc_id: str, genre: str, source: str) -> int:
        """How many times the document goes into the train split (and into the encoder's training texts)."""
        w = self.weight(genre, source)
        whole = math.floor(w)
        frac = w - whole
        if frac <= 0:
            return whole
        return whole + (1 if self.draw(doc_id) < frac else 0)

    def draw(self, doc_id: str) -> float:
        """A number in [0, 1) fixed by the document and the seed (independent of the val split's hash)."""
        digest = hashlib.blake2b(f"mixture:{self.seed}:{doc_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def key(self) -> dict[str, Any]:
        """What goes into the encoder and shards step keys: weights of 1 are left out (they change nothing)."""
        return {
            "genres": {k: w for k, w in sorted(self.genres.items()) if w != 1},
            "sources": {k: w for k, w in sorted(self.sources.items()) if w != 1},
            "max_copies": self.max_copies,
            "seed": self.seed,
        }


def group_key(genre: str, source: str) -> str:
    """How figures are keyed per genre and source, as in the dedup stats: ``"genre / source"``."""
    return f"{genre} / {source}"


def split_key(key: str) -> tuple[str, str]:
    genre, _, source = key.partition(" / ")
    return genre, source
