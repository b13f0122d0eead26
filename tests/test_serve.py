"""``jagpt serve`` as a real server process on 127.0.0.1: the JSON API, streaming, limits (queue, then 429),
clear 4xx answers to bad input, and the demo page in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, stop_process_group
from tests.registered import jagpt_env, registered

REPO = Path(__file__).resolve().parents[1]
JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")
LIMITS = {"max-new-tokens": 100_000, "max-prompt-chars": 200, "max-samples": 3, "max-concurrent": 1, "max-queue": 1,
          "queue-timeout": 60}


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return registered(tmp_path_factory)


@pytest.fixture(scope="module")
def server(reg, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [sys.executable, "-m", "flows.cli", "serve", "--config", str(reg.config), "--port", str(port)]
    for k, v in LIMITS.items():
        args += [f"--{k}", str(v)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=jagpt_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            time.sleep(0.3)
        yield url
    finally:
        stop_process_group(proc, grace_s=20)


def test_json_api(server, reg):
    info = httpx.get(f"{server}/api/info").json()
    assert info["checkpoint"] == reg.ref and info["limits"]["max_new_tokens"] == 100_000
    assert info["limits"]["max_prompt_tokens"] == reg.record["model"]["seq_len"] - 1
    body = {"prompt": "むかし、むかし", "max_new_tokens": 30, "seed": 5, "num_samples": 2}
    first = httpx.post(f"{server}/api/generate", json=body, timeout=120)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert len(answer["samples"]) == 2 and answer["text"] == answer["samples"][0] and answer["seed"] == 5
    assert JAPANESE.search(answer["text"]) and answer["samples"][0] != answer["samples"][1]
    again = httpx.post(f"{server}/api/generate", json=body, timeout=120).json()
    assert again["samples"] == answer["samples"]  # the same seed, the same text

    with httpx.stream("POST", f"{server}/api/generate/stream", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        messages = [json.loads(line) for line in r.iter_lines() if line]
    done = messages[-1]
    assert done["done"] is True and done["samples"] == answer["samples"]
    for i in (0, 1):
        assert "".join(m["text"] for m in messages[:-1] if m["sample"] == i) == done["samples"][i]


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 422, "the body is not valid JSON"),
    ({"prompt": "あ", "top_p": 3}, 422, "top_p: Input should be less than or equal to 1"),
    ({"prompt": "あ", "temperature": "hot"}, 422, "temperature: Input should be a valid number"),
    ({"prompt": "あ", "top_k": -1}, 422, "top_k: Input should be greater than or equal to 0"),
    ({"prompt": "あ", "max_new_tokens": 100_001}, 422, "max_new_tokens: 100001 is over this server's limit of 100000"),
    ({"prompt": "あ", "max_new_tokens": 5, "min_new_tokens": 9}, 422, "min_new_tokens: 9 is more than max_new_tokens 5"),
    ({"prompt": "あ", "num_samples": 9}, 422, "num_samples: 9 is over this server's limit of 3"),
    ({"prompt": "あ", "surprise": 1}, 422, "surprise: Extra inputs are not permitted"),
    ({"prompt": "あ" * 201}, 413, "the prompt has 201 characters; this server takes at most 200"),
    ({"prompt": "🍣" * 100}, 413, "tokens; this server takes at most"),
    ([1, 2], 422, "Input should be a valid dictionary"),
])
def test_bad_input_gets_a_clear_4xx(server, body, status, message):
    for path in ("/api/generate", "/api/generate/stream"):
        if isinstance(body, str):
            r = httpx.post(server + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        else:
            r = httpx.post(server + path, json=body, timeout=30)
        assert r.status_code == status, r.text
        assert message in r.json()["error"], r.json()
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_one_generation_at_a_time_one_waiting_the_rest_429_and_a_client_leaving_frees_its_slot(server):
    # 100,000 tokens: minutes of work, so the slot stays taken until this client goes away
    endless = {"prompt": "むかし", "max_new_tokens": 100_000, "min_new_tokens": 100_000, "seed": 1}
    results = {}

    def queued():
        r = httpx.post(f"{server}/api/generate", json={"prompt": "町", "max_new_tokens": 5, "seed": 2}, timeout=300)
        results["b"] = (r.status_code, time.monotonic())

    load = lambda: httpx.get(f"{server}/api/info").json()["load"]  # noqa: E731
    with httpx.stream("POST", f"{server}/api/generate/stream", json=endless, timeout=300) as a:
        assert a.status_code == 200
        lines = a.iter_lines()
        assert json.loads(next(lines))["sample"] == 0  # running
        b = threading.Thread(target=queued)
        b.start()
        deadline = time.monotonic() + 30
        while load() != {"running": 1, "waiting": 1}:  # b waits for the slot
            assert time.monotonic() < deadline and b.is_alive(), (load(), results)
            time.sleep(0.02)
        c = httpx.post(f"{server}/api/generate", json={"prompt": "空", "max_new_tokens": 5}, timeout=30)
        assert c.status_code == 429, c.text
        assert "the server is busy" in c.json()["error"] and c.headers["retry-after"] == "2"
        next(lines)
        assert "b" not in results and b.is_alive()  # still waiting, not dropped
        left = time.monotonic()
    # the client went away: its generation stops after the current token and the queued request runs
    b.join(60)
    assert results["b"][0] == 200 and results["b"][1] - left < 10
    deadline = time.monotonic() + 10
    while load() != {"running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, load()
        time.sleep(0.02)


def test_demo_page_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert os.path.exists(chromium), "Debian's chromium is not installed: apt-get install -y chromium (make test does)"
    artifacts = Path(os.environ.get("JAGPT_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('checkpoint').textContent.startsWith('checkpoint ')")
            page.fill("#prompt", "")
            page.locator("#prompt").type("むかし、むかし、あるところに")
            page.fill("#max_new_tokens", "60")
            page.fill("#seed", "3")
            page.get_by_role("button", name="Generate").click()
            page.wait_for_function("document.getElementById('generated').textContent.length > 0")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
            generated = page.inner_text("#generated")
            shot = page.screenshot(full_page=True)
            (artifacts / "serve-demo.png").write_bytes(shot)
            (tmp_path / "serve-demo.png").write_bytes(shot)
            checkpoint = page.inner_text("#checkpoint")
        finally:
            browser.close()
    assert JAPANESE.search(generated), generated
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    assert "checkpoint run-verbs-60" in checkpoint
    api = httpx.post(f"{server}/api/generate", json={"prompt": "むかし、むかし、あるところに", "max_new_tokens": 60,
                                                     "seed": 3, "temperature": 0.9, "top_k": 40}, timeout=120).json()
    assert api["text"] == generated  # the page shows what the API generates with the same settings
