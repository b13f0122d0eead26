"""Typed parameters of the deployed flows (prefect.yaml), shared with the Cloud TPU launcher.

Prefect turns these pydantic models into the JSON schema of a deployment's
parameters: every field has a default, so a Quick run in the UI needs no input,
and a Custom run shows a form with one typed input per field (a choice for
``target`` and ``preset``, a switch for ``spot``, ...). No Prefect here, so the
launcher (``infra.launcher``) can import it on its own.

Terraform (``infra/terraform``) uses the same names for the same things:
``tpu_type``, ``zone`` and ``spot``; ``storage_root`` is
``gs://<bucket_name>/<storage_prefix>`` (see :mod:`infra.tfvars`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.config import PRESETS

# The preset names of model.config, as a choice in the UI form.
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]

DEFAULT_TPU_TYPE = "v4-8"
DEFAULT_ZONE = "us-central2-b"


class TrainParams(BaseModel):
    """Where and how long the ``train`` deployment trains. Steps and storage root left empty keep the config's values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["local", "tpu"] = Field(
        default="local", title="Target",
        description="local: train in the worker's process, on its devices; tpu: a Cloud TPU VM through infra.launcher",
    )
    preset: PresetName = Field(default="tiny", title="Preset", description="model shape (model/config.py)")
    tpu_type: str = Field(
        default=DEFAULT_TPU_TYPE, title="TPU type", pattern=r"^v\d+[a-z]*(pod)?-\d+$",
        description="Cloud TPU accelerator type, e.g. v4-8, v5litepod-8, v6e-8 (target tpu only)",
    )
    zone: str = Field(
        default=DEFAULT_ZONE, title="Zone", pattern=r"^[a-z]+-[a-z]+\d+-[a-z]$",
        description="Google Cloud zone with quota for that TPU type (target tpu only)",
    )
    spot: bool = Field(default=True, title="Spot",
                       description="on: Spot capacity (cheaper, may be preempted); off: on-demand (target tpu only)")
    steps: int | None = Field(default=None, gt=0, title="Steps", description="training steps; empty: the config's train.steps")
    storage_root: str | None = Field(
        default=None, title="Storage root",
        description="where the shards are read and the run is written: ./data or gs://bucket/prefix; empty: the config's "
        "storage.root (target tpu needs gs://)",
    )

    @model_validator(mode="after")
    def _tpu_needs_gcs(self) -> TrainParams:
        if self.target == "tpu" and self.storage_root is not None and not self.storage_root.startswith("gs://"):
            raise ValueError(f"target tpu needs a gs:// storage root the TPU VM can reach, got {self.storage_root!r}")
        return self
