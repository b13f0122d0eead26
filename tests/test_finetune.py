"""``jagpt finetune``: fine-tuning a registered checkpoint on a small dialogue set lowers the validation loss
on that set, the result is registered with its parent, reruns reuse it, and early stopping keeps the best step."""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys

import numpy as np
import pytest

from encoder.shards import is_val
from flows.stages import load_checkpoint
from model import registry
from model.finetune import read_documents
from model.score import score_texts
from tests.registered import copy_of, registered

NAMES = ["田中", "佐藤", "鈴木", "山田", "高橋", "伊藤", "渡辺", "中村"]
THINGS = ["お茶", "本", "傘", "自転車", "パン", "手紙", "時計", "花", "地図", "切符"]
PLACES = ["駅", "図書館", "公園", "学校", "市場", "病院", "郵便局", "港"]


def dialogues(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        thing, place = rng.choice(THINGS), rng.choice(PLACES)
        out.append(f"{a}「こんにちは、{b}さん。{thing}はどこですか。」\n{b}「{thing}なら{place}にありますよ。」\n"
                   f"{a}「ありがとうございます。{place}へ行ってみます。」")
    return out


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    # a copy: the checkpoints registered here must not become the newest of the shared root
    return copy_of(registered(tmp_path_factory), tmp_path_factory.mktemp("finetune") / "root")


@pytest.fixture(scope="module")
def dialogue_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dialogues") / "dialogues.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in dialogues(48):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def run_cli(reg, monkeypatch, *args: str) -> tuple[int, str, str]:
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = main([*args, "--config", str(reg.config)])
    monkeypatch.undo()
    return code, out.getvalue(), err.getvalue()


def summary(out: str) -> dict:
    return json.loads(out[: out.rindex("}") + 1])


def test_finetuning_on_dialogues_lowers_their_validation_loss(reg, dialogue_file, monkeypatch):
    code, out, err = run_cli(reg, monkeypatch, "finetune", str(dialogue_file), "--checkpoint", reg.ref, "--steps", "30",
                             "--eval-every", "10", "--val-fraction", "0.2", "--lr", "1e-3")
    assert code == 0, err
    stats = summary(out)
    assert stats["parent"] == reg.ref
    assert stats["final_val_loss"] < stats["first_val_loss"] - 0.5  # step 0 is the parent on the same val split

    records = registry.records(reg.storage)
    child = records[-1]
    assert child["run_id"].startswith("ft-") and child["parent"] == reg.ref
    assert child["step"] == stats["steps"] and child["val_loss"] == stats["final_val_loss"]
    assert child["tokenizer_id"] == reg.record["tokenizer_id"] and child["model"] == reg.record["model"]
    assert f"registered: {child['run_id']}-{child['step']} (parent {reg.ref})" in out

    # Measured again from outside the loop: the held-out dialogues are likelier under the fine-tuned model.
    held_out = [t for t in dialogues(48) if is_val(hashlib.sha256(t.encode()).hexdigest()[:32], 0.2)]
    assert 3 <= len(held_out) <= 20
    _, encoder, parent = load_checkpoint(reg.storage, reg.ref)
    _, _, tuned = load_checkpoint(reg.storage, f"{child['run_id']}-{child['step']}")
    before = np.mean([s.logprob for s in score_texts(parent, encoder, held_out)])
    after = np.mean([s.logprob for s in score_texts(tuned, encoder, held_out)])
    assert after > before + 10

    # The same command again: both steps are reused and the record is not written twice.
    code, out, err = run_cli(reg, monkeypatch, "finetune", str(dialogue_file), "--checkpoint", reg.ref, "--steps", "30",
                             "--eval-every", "10", "--val-fraction", "0.2", "--lr", "1e-3")
    assert code == 0, err
    assert "already registered" in out and len(registry.records(reg.storage)) == len(records)


def test_early_stopping_keeps_the_best_step(reg, dialogue_file, monkeypatch):
    code, out, err = run_cli(reg, monkeypatch, "finetune", str(dialogue_file), "--checkpoint", reg.ref, "--steps", "200",
                             "--eval-every", "2", "--patience", "2", "--lr", "0.05", "--warmup-steps", "0")
    assert code == 0, err
    stats = summary(out)
    assert stats["stopped_early"] is True and stats["steps_run"] < 200
    from model.metrics import read_metrics

    run_dir = stats["checkpoint"].rsplit("/checkpoints/", 1)[0]
    vals = [r for r in read_metrics(reg.storage, run_dir) if "val_loss" in r and r["step"] > 0]
    best = min(vals, key=lambda r: r["val_loss"])
    assert stats["steps"] == best["step"] and stats["final_val_loss"] == round(best["val_loss"], 4)
    assert [r["step"] for r in vals if r["step"] > best["step"]] == [best["step"] + 2, best["step"] + 4]  # patience 2
    assert stats["steps_run"] == best["step"] + 4
    assert reg.storage.exists(f"{stats['checkpoint']}/meta")  # the best step's checkpoint is kept
    load_checkpoint(reg.storage, f"{run_dir.rsplit('/', 1)[1]}-{stats['steps']}")


def test_documents_and_bad_input(reg, tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("一つ目の文書。\n二行目。\n\n\n二つ目の文書。\r\n\u3000\r\n三つ目。\n", encoding="utf-8")
    assert read_documents([str(text)]) == ["一つ目の文書。\n二行目。", "二つ目の文書。", "三つ目。"]
    lines = tmp_path / "mixed.jsonl"
    lines.write_text('"文字列だけ"\n\n{"body": "別の欄", "text": "本文"}\n', encoding="utf-8")
    assert read_documents([str(lines)]) == ["文字列だけ", "本文"]
    assert read_documents([str(lines)], "body") == ["文字列だけ", "別の欄"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "よい"}\n{"title": "本文がない"}\n', encoding="utf-8")
    code, out, err = run_cli(reg, monkeypatch, "finetune", str(bad), "--checkpoint", reg.ref)
    assert code == 2 and "bad.jsonl:2: expected a JSON string or an object with a string field 'text'" in err
    code, out, err = run_cli(reg, monkeypatch, "finetune", str(lines), "--checkpoint", reg.ref)
    assert code == 2 and "fewer than one window" in err
    code, out, err = run_cli(reg, monkeypatch, "finetune", str(text), "--checkpoint", reg.ref, "--val-fraction", "1.5")
    assert code == 2 and "--val-fraction" in err
    code, out, err = run_cli(reg, monkeypatch, "finetune", str(tmp_path / "none.txt"))
    assert code == 2 and "no such file" in err
