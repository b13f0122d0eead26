import os
import subprocess
import sys

import pytest

from flows.config import ConfigError, load_config, parse_config

JAGPT = os.path.join(os.path.dirname(sys.executable), "jagpt")


def test_embedded_default_is_valid():
    cfg = load_config(None)
    assert cfg.storage.root == "./data"
    assert cfg.sources[0].serve_sample_site
    assert cfg.train.preset == "tiny"


def test_error_names_field_and_value():
    with pytest.raises(ConfigError) as e:
        parse_config("sources:\n  - name: s\n    start_urls: ['http://a.example/']\n    max_pages: -3\n", "x.yaml")
    msg = str(e.value)
    assert "x.yaml" in msg and "sources.0.max_pages" in msg and "-3" in msg


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="trian"):
        parse_config("sources:\n  - name: s\n    start_urls: ['http://a.example/']\ntrian: {steps: 3}\n")


def test_bad_url_and_regex_and_missing_seeds():
    with pytest.raises(ConfigError, match="not an http"):
        parse_config("sources:\n  - name: s\n    start_urls: ['ftp://a.example/']\n")
    with pytest.raises(ConfigError, match="bad regex"):
        parse_config("sources:\n  - name: s\n    start_urls: ['http://a.example/']\n    deny: ['(']\n")
    with pytest.raises(ConfigError, match="neither start_urls nor sitemaps"):
        parse_config("sources:\n  - name: s\n")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_reports_config_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("sources:\n  - name: s\n    start_urls: ['http://a.example/']\ntrain: {steps: 0}\n")
    done = subprocess.run([JAGPT, "config", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "train.steps" in done.stderr and "(got 0)" in done.stderr
