"""``jagpt export --hf DIR``: transformers loads the folder with no custom code, its logits equal the Flax
model's (fp32, max abs diff <= 1e-4), its tokenizer's ids equal jagpt's on tricky strings, generate() runs
(greedy, the same tokens as jagpt's cached decoder), and the model card says what it should."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from flax import nnx

from flows.stages import load_checkpoint
from model.decode import Decoder, Sampling
from tests.registered import TEXTS, registered

TRICKY = [
    "むかし、むかし、あるところに",
    "絵文字🍣🍺👨‍👩‍👧と国旗🇯🇵",
    "珍しい漢字：𠮷野家、𩸽、鬱、龘、〆切、々",
    "ﾊﾝｶｸｶﾀｶﾅﾃﾞｽ｡ｶﾞｷﾞｸﾞ",
    "一行目\n二行目\r\n\n\n三行目\n",
    "  先頭と末尾の空白  \t タブ\u3000全角空白　",
    "<|endoftext|>と<|pad|>は文字として",
    "English words, 123 数字 ４５６ and ＡＢＣ",
    "",
    "\u0000制御文字\u0007",
]


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return registered(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(reg, tmp_path_factory):
    """The folder written by ``jagpt export``, loaded once by transformers (importing torch is slow)."""
    from flows.cli import main

    out = tmp_path_factory.mktemp("hf") / "model"
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        code = main(["export", "--hf", str(out), "--checkpoint", reg.ref, "--config", str(reg.config)])
        printed, errors = sys.stdout.getvalue(), sys.stderr.getvalue()
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    assert code == 0, errors
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    record, encoder, flax_model = load_checkpoint(reg.storage, reg.ref)
    return {"dir": out, "printed": printed, "hf": model, "tok": tokenizer, "flax": flax_model, "encoder": encoder,
            "record": record}


def test_the_folder_holds_what_transformers_needs(exported):
    d = exported["dir"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "README.md", "loss.png"):
        assert (d / name).is_file(), name
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert "auto_map" not in config  # no custom code
    from transformers import GPT2LMHeadModel

    assert type(exported["hf"]) is GPT2LMHeadModel
    hf = exported["hf"]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in jagpt
    generation = json.loads((d / "generation_config.json").read_text())
    assert generation["eos_token_id"] == exported["encoder"].eot_id and generation["top_k"] == 40
    assert str(d) in exported["printed"]


def test_logits_equal_the_flax_model_s(exported):
    import torch

    encoder, flax_model, hf = exported["encoder"], exported["flax"], exported["hf"]
    ctx = flax_model.cfg.seq_len
    forward = nnx.jit(lambda m, x: m(x))
    worst = 0.0
    for text in TEXTS[:6] + TRICKY[:4]:
        ids = [encoder.eot_id, *encoder.encode(text)][:ctx]
        window = np.zeros((1, ctx), np.int32)
        window[0, :len(ids)] = ids
        want = np.asarray(forward(flax_model, window))[0, :len(ids)]
        with torch.no_grad():
            got = hf(torch.tensor([ids])).logits[0].numpy()
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-4, worst


def test_the_tokenizer_gives_jagpt_s_ids_and_text(exported):
    tok, encoder = exported["tok"], exported["encoder"]
    for text in TRICKY + TEXTS[:3]:
        ids = tok(text)["input_ids"]
        assert ids == encoder.encode(text), text
        assert tok.decode(ids) == encoder.decode(ids) == text
    assert tok.eos_token_id == encoder.eot_id and tok.pad_token_id == encoder.pad_id
    assert tok(TRICKY[6])["input_ids"][0] != encoder.eot_id  # typed special-token text stays text
    byte_tokens = [i for i in encoder.encode(TRICKY[2]) if tok.convert_ids_to_tokens(i).startswith("<0x")]
    assert byte_tokens  # the rare kanji went through byte fallback, and still matched


def test_generate_runs_and_greedy_matches_jagpt(exported):
    import torch

    tok, hf, encoder, flax_model = exported["tok"], exported["hf"], exported["encoder"], exported["flax"]
    prompt = "むかし、むかし、"
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == 20
    ours = [int(t[0]) for t in Decoder(flax_model).generate(encoder.encode(prompt), 20, encoder.eot_id,
                                                              Sampling(temperature=0, min_new_tokens=20))]
    assert new == ours
    with torch.no_grad():
        sampled = hf.generate(**inputs, max_new_tokens=10, do_sample=True, top_k=40)
    assert sampled.shape[1] > inputs["input_ids"].shape[1]
    assert tok.decode(sampled[0]).startswith(prompt)


def test_the_model_card(exported, reg):
    card = (exported["dir"] / "README.md").read_text(encoding="utf-8")
    record = exported["record"]
    assert card.startswith("---\nlanguage: ja\nlicense: apache-2.0\n")
    assert f"# jagpt {reg.ref}" in card
    rows = {line.split(" | ")[0].strip("| "): line for line in card.splitlines() if line.startswith("| ")}
    assert "novel" in rows and "news" in rows  # the data by genre
    manifest = reg.storage.read_json(f"{record['shards']}/manifest.json")
    novel_tokens = sum(c["written_tokens"] for k, c in manifest["splits"]["train"]["composition"].items()
                       if k.startswith("novel"))
    assert f"{novel_tokens:,}" in rows["novel"]
    assert "characters per token (its training text)" in card and "256 byte tokens" in card
    assert "![training and validation loss](loss.png)" in card
    assert f"| validation loss (nats per token) | {record['val_loss']} |" in card
    assert f"| validation bits per character | {record['bits_per_char']} |" in card
    assert "## License and intended use" in card and "Apache-2.0" in card and "Intended use" in card
    assert "split_special_tokens" in card


def test_export_refuses_a_folder_in_use(reg, tmp_path, monkeypatch):
    from flows.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["export", "--hf", str(tmp_path), "--config", str(reg.config)]) == 2
    assert "not an empty folder" in err.getvalue() and (tmp_path / "keep.txt").read_text() == "mine"
