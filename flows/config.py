"""The one YAML config: storage root, sources, and each stage's settings.

``load_config(None)`` gives the embedded default (the bundled sample site,
small enough for a laptop). Errors name the field and the value.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from corpus.clean import CleanSettings
from corpus.dedup import DedupSettings
from corpus.extract import ExtractSettings
from corpus.mixture import MixtureSettings
from corpus.settings import Settings
from corpus.storage import Storage
from crawlers.config import CrawlSettings, Source
from encoder.bpe import EncoderSettings
from encoder.shards import ShardSettings
from model.train import TrainSettings


class StorageConfig(Settings):
    root: str = "./data"
    # Passed to fsspec, e.g. {"project": "my-project"} or, for an emulator,
    # {"endpoint_url": "http://127.0.0.1:9023", "token": "anon"}. Credentials
    # come from the environment (gcloud auth), never from this file.
    options: dict[str, Any] = {}


class GenerateSettings(Settings):
    prompt: str = "むかし、むかし"
    max_new_tokens: int = Field(default=80, gt=0)
    top_k: int = Field(default=40, ge=0)
    temperature: float = Field(default=0.9, gt=0)
    seed: int = 0


class RunnerSettings(Settings):
    """Where the per-partition tasks (extract, clean) run; the rest of the flow stays in-process.

    Neither set: Prefect's default thread pool, in the flow's process.
    """

    # An existing Dask scheduler, e.g. "tcp://10.0.0.5:8786".
    dask_address: str | None = None
    # Start a local Dask cluster of this many worker processes (one thread each) for the run.
    dask_local_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_cluster(self) -> RunnerSettings:
        if self.dask_address and self.dask_local_workers:
            raise ValueError("set dask_address or dask_local_workers, not both")
        return self


class Config(Settings):
    storage: StorageConfig = StorageConfig()
    sources: list[Source] = Field(min_length=1)
    crawl: CrawlSettings = CrawlSettings()
    extract: ExtractSettings = ExtractSettings()
    clean: CleanSettings = CleanSettings()
    dedup: DedupSettings = DedupSettings()
    # Weights per genre and source: what the encoder and the shards' train split sample.
    mixture: MixtureSettings = MixtureSettings()
    encoder: EncoderSettings = EncoderSettings()
    shards: ShardSettings = ShardSettings()
    train: TrainSettings = TrainSettings()
    generate: GenerateSettings = GenerateSettings()
    runner: RunnerSettings = RunnerSettings()

    @model_validator(mode="after")
    def _mixture_names_known_sources(self) -> Config:
        names = [s.name for s in self.sources]
        unknown = [n for n in self.mixture.sources if n not in names]
        if unknown:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "unknown_source", "no source named '{name}' in sources (they are: {known})",
                            {"name": n, "known": ", ".join(names)},
                        ),
                        loc=("mixture", "sources", n),
                        input=self.mixture.sources[n],
                    )
                    for n in unknown
                ],
            )
        return self

    def storage_root(self) -> Storage:
        return Storage(self.storage.root, self.storage.options)

    def enabled_sources(self) -> list[Source]:
        return [s for s in self.sources if s.enabled]


class ConfigError(ValueError):
    pass


def default_config_text() -> str:
    return (resources.files("flows") / "default.yaml").read_text(encoding="utf-8")


def format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(text: str, origin: str = "<string>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid config ({origin}): not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({origin}): expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, origin)) from None


def load_config(path: str | None = None) -> Config:
    """The config in ``path``, or the embedded default when ``path`` is None."""
    if path is None:
        return parse_config(default_config_text(), "embedded default")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_config(f.read(), path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
