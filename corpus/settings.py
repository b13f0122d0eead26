"""The base of every stage's settings: unknown fields are errors, not silently ignored."""

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
