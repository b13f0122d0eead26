"""Terraform variables (``infra/terraform``) from a jagpt config and the ``train`` deployment's parameters.

The names map one to one, except the storage root, which Terraform splits in two::

    config storage.root = gs://<bucket_name>/<storage_prefix>
    TrainParams.tpu_type, .zone, .spot = Terraform tpu_type, zone, spot

``python -m infra.tfvars --config my.yaml --project my-project > infra/terraform/terraform.tfvars.json``
writes them for ``terraform -chdir=infra/terraform apply``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flows.params import TrainParams

# TrainParams fields that are Terraform variables of the same name.
SAME_NAME = ("tpu_type", "zone", "spot")


def split_storage_root(root: str) -> tuple[str, str]:
    """``gs://bucket/prefix`` -> (bucket, prefix); the prefix is required (the bucket holds jagpt in a folder)."""
    if not root.startswith("gs://"):
        raise ValueError(f"the Terraform bucket needs a gs:// storage root, got {root!r}")
    bucket, _, prefix = root[len("gs://"):].strip("/").partition("/")
    if not bucket or not prefix:
        raise ValueError(f"storage root {root!r} must be gs://<bucket>/<prefix>")
    return bucket, prefix


def join_storage_root(bucket: str, prefix: str) -> str:
    """The config's storage root for Terraform's bucket_name and storage_prefix (its output ``storage_root``)."""
    return f"gs://{bucket}/{prefix}"


def tfvars(storage_root: str, params: TrainParams, project: str, **extra: Any) -> dict[str, Any]:
    """The variables for a storage root and train parameters; ``extra`` adds others (e.g. ``create_tpu=True``)."""
    bucket, prefix = split_storage_root(params.storage_root or storage_root)
    zone = params.zone
    return {
        "project": project,
        "region": zone.rsplit("-", 1)[0],  # the bucket next to the TPUs: no egress when training reads shards
        "bucket_name": bucket,
        "storage_prefix": prefix,
        **{name: getattr(params, name) for name in SAME_NAME},
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    from flows.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m infra.tfvars", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="jagpt YAML config (its storage.root must be gs://bucket/prefix)")
    parser.add_argument("--project", required=True, help="Google Cloud project id")
    parser.add_argument("--tpu-type", default=TrainParams().tpu_type)
    parser.add_argument("--zone", default=TrainParams().zone)
    parser.add_argument("--on-demand", action="store_true", help="on-demand TPU capacity instead of Spot")
    parser.add_argument("--create-tpu", action="store_true", help="let Terraform create a long-lived TPU VM")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        params = TrainParams(target="tpu", tpu_type=args.tpu_type, zone=args.zone, spot=not args.on_demand)
        out = tfvars(cfg.storage.root, params, args.project, create_tpu=args.create_tpu)
    except (ConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
