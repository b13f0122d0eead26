"""infra/terraform parses, its variables are the config's and the train parameters' names, and the roles stay narrow."""

import json
import re
from pathlib import Path

import hcl2
import pytest

from flows.params import TrainParams
from infra import tfvars

TERRAFORM = Path(__file__).resolve().parents[1] / "infra" / "terraform"


def _load() -> dict[str, list]:
    """Every top-level block of every .tf file, merged by kind (variable, resource, output, ...)."""
    options = hcl2.SerializationOptions(strip_string_quotes=True, with_comments=False, explicit_blocks=False)
    merged: dict[str, list] = {}
    files = sorted(TERRAFORM.glob("*.tf"))
    assert {f.name for f in files} >= {"versions.tf", "variables.tf", "main.tf", "tpu.tf", "outputs.tf"}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for kind, blocks in hcl2.load(fh, serialization_options=options).items():
                merged.setdefault(kind, []).extend(blocks)
    return merged


@pytest.fixture(scope="module")
def tf():
    return _load()


def _variables(tf) -> dict[str, dict]:
    return {name: body for block in tf["variable"] for name, body in block.items()}


def _resources(tf) -> dict[str, dict]:
    """``type.name`` -> body."""
    return {f"{kind}.{name}": body for block in tf["resource"] for kind, named in block.items() for name, body in named.items()}


def test_providers_are_google_and_google_beta(tf):
    providers = {name: p["source"] for block in tf["terraform"] for req in block["required_providers"] for name, p in req.items()}
    assert providers == {"google": "hashicorp/google", "google-beta": "hashicorp/google-beta"}


def test_every_variable_is_typed_and_described_and_every_reference_is_declared(tf):
    variables = _variables(tf)
    assert all(v.get("type") and v.get("description") for v in variables.values())
    text = "\n".join(f.read_text(encoding="utf-8") for f in TERRAFORM.glob("*.tf"))
    referenced = set(re.findall(r"\bvar\.([a-z_]+)", text))
    assert referenced <= set(variables), referenced - set(variables)
    assert set(variables) - referenced == set()  # no variable that nothing uses


def test_variables_carry_the_train_parameters_names_and_defaults(tf):
    variables = _variables(tf)
    defaults = TrainParams()
    for name in tfvars.SAME_NAME:
        assert name in variables and name in TrainParams.model_fields
        assert variables[name]["default"] == getattr(defaults, name), name


def test_storage_root_maps_to_bucket_name_and_storage_prefix(tf):
    variables = _variables(tf)
    out = tfvars.tfvars("gs://my-bucket/team/jagpt", TrainParams(target="tpu", zone="europe-west4-a", spot=False), "my-project")
    assert set(out) <= set(variables)
    required = {name for name, v in variables.items() if "default" not in v}
    assert required <= set(out)  # a plan needs nothing else
    assert out == {"project": "my-project", "region": "europe-west4", "bucket_name": "my-bucket", "storage_prefix": "team/jagpt",
                   "tpu_type": "v4-8", "zone": "europe-west4-a", "spot": False}
    # Terraform's storage_root output, evaluated with these variables, is the config's storage.root again.
    template = next(o["storage_root"]["value"] for o in tf["output"] if "storage_root" in o)
    bucket = _resources(tf)["google_storage_bucket.jagpt"]["name"]
    assert bucket == "${var.bucket_name}"
    rendered = template.replace("${google_storage_bucket.jagpt.name}", out["bucket_name"]).replace("${var.storage_prefix}", out["storage_prefix"])
    assert rendered == tfvars.join_storage_root(out["bucket_name"], out["storage_prefix"]) == "gs://my-bucket/team/jagpt"
    # The storage_prefix validation accepts what split_storage_root makes, and the TrainParams root wins.
    condition = variables["storage_prefix"]["validation"][0]["condition"]
    pattern = re.search(r'regex\("(.+)", var\.storage_prefix\)', condition).group(1).replace("\\\\", "\\")
    assert re.fullmatch(pattern, out["storage_prefix"]) and not re.fullmatch(pattern, "/jagpt")
    assert tfvars.tfvars("gs://a/b", TrainParams(storage_root="gs://c/d"), "p")["bucket_name"] == "c"
    for bad in ("./data", "gs://bucket-only", "gs://"):
        with pytest.raises(ValueError):
            tfvars.split_storage_root(bad)


def test_roles_are_the_least_needed(tf):
    resources = _resources(tf)
    member = "serviceAccount:${google_service_account.train.email}"
    bucket_roles = [r for k, r in resources.items() if k.startswith("google_storage_bucket_iam_member.")]
    assert [(r["bucket"], r["role"], r["member"]) for r in bucket_roles] == [
        ("${google_storage_bucket.jagpt.name}", "roles/storage.objectAdmin", member)]
    project_roles = {r["role"]: r.get("count") for k, r in resources.items() if k.startswith("google_project_iam_member.")}
    # Logging always; TPU admin only when the launcher runs as this account; nothing on storage project-wide.
    assert project_roles == {"roles/logging.logWriter": None, "roles/tpu.admin": "${var.launcher_creates_tpus ? 1 : 0}"}
    acts_as = [r for k, r in resources.items() if k.startswith("google_service_account_iam_member.")]
    assert [(r["role"], r["service_account_id"], r["count"]) for r in acts_as] == [
        ("roles/iam.serviceAccountUser", "${google_service_account.train.name}", "${var.launcher_creates_tpus ? 1 : 0}")]
    pulls = [r for k, r in resources.items() if k.startswith("google_artifact_registry_repository_iam_member.")]
    assert [(r["role"], r["repository"], r["count"]) for r in pulls] == [
        ("roles/artifactregistry.reader", "${var.image_repository}", '${var.image_repository == "" ? 0 : 1}')]
    assert not any(k.startswith(("google_project_iam_binding.", "google_project_iam_policy.")) for k in resources)


def test_the_tpu_vm_is_optional_and_follows_the_variables(tf):
    vm = _resources(tf)["google_tpu_v2_vm.train"]
    assert vm["provider"] == "google-beta" and vm["count"] == "${var.create_tpu ? 1 : 0}"
    assert (vm["accelerator_type"], vm["zone"], vm["scheduling_config"][0]["spot"]) == ("${var.tpu_type}", "${var.zone}", "${var.spot}")
    assert vm["service_account"][0]["email"] == "${google_service_account.train.email}"
    assert _variables(tf)["create_tpu"]["default"] is False


def test_tfvars_command_writes_json_from_a_config(tmp_path, capsys):
    import yaml

    from flows.config import default_config_text

    cfg = yaml.safe_load(default_config_text())
    cfg["storage"] = {"root": "gs://jagpt-bucket/runs"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    assert tfvars.main(["--config", str(path), "--project", "p1", "--on-demand", "--tpu-type", "v5litepod-8",
                        "--zone", "us-west4-a"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bucket_name"] == "jagpt-bucket" and out["storage_prefix"] == "runs" and out["spot"] is False
    assert out["tpu_type"] == "v5litepod-8" and out["region"] == "us-west4" and out["create_tpu"] is False
    assert tfvars.main(["--project", "p1"]) == 2  # the embedded config's ./data is no bucket
    assert "gs://" in capsys.readouterr().err
