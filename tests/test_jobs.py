"""The deployed flows (flows/jobs.py), their typed parameters (flows/params.py) and prefect.yaml, without a server."""

import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.config import load_config
from flows.params import TrainParams

REPO = Path(__file__).resolve().parents[1]


def test_train_params_defaults_and_checks():
    p = TrainParams()
    assert (p.target, p.preset, p.spot, p.steps, p.storage_root) == ("local", "tiny", True, None, None)
    assert TrainParams.model_validate({"target": "tpu", "tpu_type": "v5litepod-8", "zone": "us-west4-a"}).tpu_type == "v5litepod-8"
    for bad in ({"target": "gpu"}, {"preset": "huge"}, {"tpu_type": "v4_8"}, {"zone": "tokyo"}, {"steps": 0},
                {"target": "tpu", "storage_root": "./data"}, {"colour": "red"}):
        with pytest.raises(ValidationError):
            TrainParams.model_validate(bad)


def test_train_form_is_typed_and_every_field_has_a_default():
    """What the UI's Custom run form is built from; Quick run needs every parameter to have a default."""
    from prefect.utilities.callables import parameter_schema

    from flows.jobs import train

    schema = parameter_schema(train.fn).model_dump_for_openapi()
    assert set(schema["properties"]) == {"params", "config_path"} and not schema.get("required")
    fields = schema["definitions"]["TrainParams"]["properties"]
    assert {k: v["title"] for k, v in fields.items()} == {
        "target": "Target", "preset": "Preset", "tpu_type": "TPU type", "zone": "Zone", "spot": "Spot", "steps": "Steps",
        "storage_root": "Storage root"}
    assert fields["target"]["enum"] == ["local", "tpu"] and fields["spot"]["type"] == "boolean"
    assert "175b" in fields["preset"]["enum"] and all("default" in f for f in fields.values())


def test_train_params_override_the_config():
    from flows.jobs import with_params

    cfg = load_config(None)
    same = with_params(cfg, TrainParams())
    assert same.train.steps == cfg.train.steps and same.storage.root == cfg.storage.root
    changed = with_params(cfg, TrainParams(preset="mini", steps=7, storage_root="gs://b/p"))
    assert (changed.train.preset, changed.train.steps, changed.storage.root) == ("mini", 7, "gs://b/p")
    assert changed.train.seq_len == cfg.train.seq_len and changed.sources == cfg.sources


def test_target_tpu_without_the_launcher_fails_clearly(monkeypatch):
    from flows.jobs import LAUNCHER_MISSING, train

    monkeypatch.setitem(sys.modules, "infra.launcher", None)  # as in a build without infra/launcher.py
    with pytest.raises(RuntimeError, match="the TPU launcher is not installed in this build"):
        train.fn(params=TrainParams(target="tpu", storage_root="gs://bucket/prefix"))
    assert "not installed" in LAUNCHER_MISSING
    with pytest.raises(ValueError, match="gs://"):  # the embedded config's ./data is out of a TPU VM's reach
        train.fn(params=TrainParams(target="tpu"))


def test_flows_on_the_current_corpus_need_one(tmp_path):
    from corpus.storage import Storage
    from flows import stages

    with pytest.raises(LookupError, match="no corpus built"):
        stages.current_corpus(Storage(str(tmp_path)))


def test_prefect_yaml_deploys_each_flow_to_the_process_pool():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"corpus-refresh", "encoder-train", "tokenize-shards", "train", "pipeline"}
    for name, d in deployments.items():
        flow = load_flow_from_entrypoint(str(REPO / d["entrypoint"]))
        assert flow.name == name  # so `prefect deployment run NAME/NAME` works
        assert d["work_pool"]["name"] == "jagpt-process" and d["concurrency_limit"] == 1
    refresh = deployments["corpus-refresh"]["schedules"]
    assert refresh == [{"cron": "0 3 * * 1", "timezone": "Asia/Tokyo", "active": True}]
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ repo.stdout }}"}}]
