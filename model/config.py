"""Model shapes: the GPT-3 table (Brown et al., 2020) plus tiny presets for tests and the demo."""

from __future__ import annotations

from pydantic import Field, model_validator

from corpus.settings import Settings


class ModelConfig(Settings):
    vocab_size: int = Field(gt=0)
    seq_len: int = Field(default=2048, gt=0)
    n_layer: int = Field(gt=0)
    d_model: int = Field(gt=0)
    n_head: int = Field(gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def n_params(self) -> int:
        """Parameters, embeddings included (the output layer is tied to them)."""
        d, L = self.d_model, self.n_layer
        per_block = 12 * d * d + 13 * d  # qkv, proj, 2 MLP layers with biases, 2 LayerNorms
        return self.vocab_size * d + self.seq_len * d + L * per_block + 2 * d


# name: (n_layer, d_model, n_head, batch tokens, learning rate)
# Two rows of the paper's table do not multiply out, and keep its d_head of 128:
# XL lists 24 heads of 128 with d_model 2048 (24 x 128 = 3072), so it has 16;
# 13B lists d_model 5140, so it has 5120, which 40 heads of 128 divide.
GPT3_PRESETS: dict[str, tuple[int, int, int, int, float]] = {
    "small": (12, 768, 12, 500_000, 6.0e-4),
    "medium": (24, 1024, 16, 500_000, 3.0e-4),
    "large": (24, 1536, 16, 500_000, 2.5e-4),
    "xl": (24, 2048, 16, 1_000_000, 2.0e-4),
    "2.7b": (32, 2560, 32, 1_000_000, 1.6e-4),
    "6.7b": (32, 4096, 32, 2_000_000, 1.2e-4),
    "13b": (40, 5120, 40, 2_000_000, 1.0e-4),
    "175b": (96, 12288, 96, 3_200_000, 0.6e-4),
}
TINY_PRESETS: dict[str, tuple[int, int, int, int, float]] = {
    "tiny": (2, 128, 4, 2048, 3e-3),
    "mini": (4, 256, 8, 8192, 1e-3),
}
PRESETS = {**TINY_PRESETS, **GPT3_PRESETS}


def preset(name: str, vocab_size: int, seq_len: int | None = None) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    n_layer, d_model, n_head, _, _ = PRESETS[key]
    default_len = 2048 if key in GPT3_PRESETS else 256
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len or default_len, n_layer=n_layer, d_model=d_model, n_head=n_head)
