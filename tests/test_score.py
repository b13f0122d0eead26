"""``jagpt score`` and ``jagpt embed``: the figures equal direct computations with the model, do not
depend on batching, handle texts longer than the context, and the CLI's TSV, JSON and .npy outputs."""

from __future__ import annotations

import io
import json
import random
import sys

import numpy as np
import pytest
from flax import nnx

from flows.stages import load_checkpoint
from model.score import embed_texts, score_texts
from tests.registered import TEXTS, registered

LINES = ["むかし、むかし、あるところに", "昨日は雨でした。", "", "\tタブと 空白  と🍣と𠮷", "<|endoftext|>は文字として読む"]


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return registered(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(reg):
    record, encoder, model = load_checkpoint(reg.storage, reg.ref)
    return model, encoder


_forward = nnx.jit(lambda m, x: m(x))


def direct_logprobs(model, inputs: list[int], targets: list[int]) -> np.ndarray:
    """log-softmax of the model's logits at the targets, from one whole forward pass (padded to the context:
    causal attention does not see the padding)."""
    x = np.zeros((1, model.cfg.seq_len), np.int32)
    x[0, :len(inputs)] = inputs
    logits = np.asarray(_forward(model, x))[0, :len(inputs)].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return logp[np.arange(len(targets)), targets]


def test_scores_equal_the_model_s_log_softmax_whatever_the_batch(loaded):
    model, encoder = loaded
    together = score_texts(model, encoder, LINES)
    for text, s in zip(LINES, together):
        seq = [encoder.eot_id, *encoder.encode(text), encoder.eot_id]
        want = direct_logprobs(model, seq[:-1], seq[1:])
        assert s.ids == seq[1:] and len(s.logprobs) == len(seq) - 1
        np.testing.assert_allclose(s.logprobs, want, atol=1e-4)
        assert s.logprob == pytest.approx(want.sum(), abs=1e-3)
        alone = score_texts(model, encoder, [text])[0]
        np.testing.assert_allclose(alone.logprobs, s.logprobs, atol=1e-5)
    assert encoder.encode(LINES[4])[0] != encoder.eot_id  # typed special-token text is text

    ends = score_texts(model, encoder, LINES, exclude_end=True)
    for s, e in zip(together, ends):
        assert e.ids == s.ids[:-1] and e.logprob == pytest.approx(s.logprob - s.logprobs[-1], abs=1e-4)


def test_a_text_longer_than_the_context_is_scored_in_overlapping_windows(loaded):
    model, encoder = loaded
    ctx, stride = model.cfg.seq_len, model.cfg.seq_len // 2
    text = "".join(TEXTS[:6])
    seq = [encoder.eot_id, *encoder.encode(text), encoder.eot_id]
    assert len(seq) > 3 * ctx
    s = score_texts(model, encoder, [text])[0]
    assert len(s.logprobs) == len(seq) - 1
    inputs, targets = seq[:-1], seq[1:]
    want = np.zeros(len(targets))
    want[:ctx] = direct_logprobs(model, inputs[:ctx], targets[:ctx])
    windows = {}
    for j in range(ctx, len(targets)):  # each later token with the window that scores it: at least half a context before it
        start = ((j - ctx) // stride + 1) * stride
        assert j - start >= stride
        if start not in windows:
            windows[start] = direct_logprobs(model, inputs[start:start + ctx], targets[start:start + ctx])
        want[j] = windows[start][j - start]
    np.testing.assert_allclose(s.logprobs, want, atol=1e-4)


def test_the_trained_model_prefers_real_sentences_to_shuffled_ones(loaded):
    model, encoder = loaded
    rng = random.Random(0)
    real = [t[:40] for t in TEXTS[:20]]
    shuffled = ["".join(rng.sample(t, len(t))) for t in real]
    a, b = score_texts(model, encoder, real), score_texts(model, encoder, shuffled)
    per_char = lambda scored: np.mean([s.logprob / len(t) for s, t in zip(scored, real)])  # noqa: E731
    assert per_char(a) > per_char(b) + 0.3
    assert sum(x.logprob > y.logprob for x, y in zip(a, b)) >= 17


def test_embeddings_are_pooled_final_hidden_states(loaded):
    model, encoder = loaded
    hidden_padded = nnx.jit(lambda m, x: m.hidden(x))

    def hidden(model, x):
        padded = np.zeros((1, model.cfg.seq_len), np.int32)
        padded[:, :x.shape[1]] = x
        return np.asarray(hidden_padded(model, padded))[:, :x.shape[1]]
    mean, cut = embed_texts(model, encoder, LINES)
    last, _ = embed_texts(model, encoder, LINES, pooling="last")
    unit, _ = embed_texts(model, encoder, LINES, normalize=True)
    assert mean.shape == (len(LINES), model.cfg.d_model) and mean.dtype == np.float32 and cut == []
    for i, text in enumerate(LINES):
        seq = [encoder.eot_id, *encoder.encode(text)]
        h = np.asarray(hidden(model, np.array([seq], np.int32)))[0]
        np.testing.assert_allclose(mean[i], h[1:].mean(0) if len(seq) > 1 else h[0], atol=1e-4)
        np.testing.assert_allclose(last[i], h[-1], atol=1e-4)
        np.testing.assert_allclose(embed_texts(model, encoder, [text])[0][0], mean[i], atol=1e-5)  # batch-independent
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    long = "".join(TEXTS[:4])
    vectors, cut = embed_texts(model, encoder, ["短い", long])
    assert cut == [1] and np.isfinite(vectors).all()
    with pytest.raises(ValueError, match="pooling"):
        embed_texts(model, encoder, ["x"], pooling="max")


def run_cli(reg, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = main([*args, "--config", str(reg.config)])
    monkeypatch.undo()
    return code, out.getvalue(), err.getvalue()


def test_jagpt_score_tsv_and_json(reg, loaded, monkeypatch, tmp_path):
    model, encoder = loaded
    want = score_texts(model, encoder, LINES)
    code, out, err = run_cli(reg, monkeypatch, "score", stdin="\n".join(LINES) + "\n")
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0] == ["line", "logprob", "tokens", "text"] and len(rows) == len(LINES) + 1
    for row, s, text in zip(rows[1:], want, LINES):
        assert len(row) == 4 and float(row[1]) == pytest.approx(s.logprob, abs=1e-5) and int(row[2]) == len(s.ids)
    assert rows[4][3] == "\\tタブと 空白  と🍣と𠮷"  # a tab in the text is escaped

    path = tmp_path / "lines.txt"
    path.write_text("\n".join(LINES[:2]) + "\n", encoding="utf-8")
    code, out, err = run_cli(reg, monkeypatch, "score", str(path), "--tokens", "--exclude-end")
    assert code == 0, err
    header, first, second = (line.split("\t") for line in out.splitlines())
    assert header[-1] == "token_logprobs"
    pairs = json.loads(first[4])
    assert [p for p, _ in pairs] == [encoder.tokenizer.id_to_token(i) for i in encoder.encode(LINES[0])]
    assert sum(lp for _, lp in pairs) == pytest.approx(float(first[1]), abs=1e-4)

    code, out, err = run_cli(reg, monkeypatch, "score", "--json", "--tokens", stdin=LINES[3] + "\n")
    assert code == 0, err
    row = json.loads(out)
    assert row["text"] == LINES[3] and row["line"] == 1 and row["logprob"] == pytest.approx(want[3].logprob, abs=1e-5)
    assert row["token_logprobs"][-1]["token"] == "<|endoftext|>" and len(row["token_logprobs"]) == row["tokens"]

    code, out, err = run_cli(reg, monkeypatch, "score", str(tmp_path / "missing.txt"))
    assert code == 2 and "no such file" in err


def test_jagpt_embed_npy_and_jsonl(reg, loaded, monkeypatch, tmp_path):
    model, encoder = loaded
    want, _ = embed_texts(model, encoder, LINES, pooling="last")
    npy = tmp_path / "v.npy"
    code, out, err = run_cli(reg, monkeypatch, "embed", "--pooling", "last", "--out", str(npy), stdin="\n".join(LINES) + "\n")
    assert code == 0, err
    np.testing.assert_allclose(np.load(npy), want, atol=1e-6)
    code, out, err = run_cli(reg, monkeypatch, "embed", "--normalize", stdin="むかし\n" + "".join(TEXTS[:4]) + "\n")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2] and rows[0]["text"] == "むかし"
    assert np.linalg.norm(rows[0]["embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert "1 line(s) longer than the context" in err and "(lines 2)" in err
    code, out, err = run_cli(reg, monkeypatch, "embed", "--out", str(tmp_path / "v.csv"), stdin="x\n")
    assert code == 2 and ".npy or .jsonl" in err


def test_nothing_compiles_per_line(loaded):
    from model import score

    model, encoder = loaded
    score_texts(model, encoder, ["あ" * 5, "い" * 7, "き"])  # 16 positions, 4 rows
    before = score._gold_logprobs._cache_size()
    score_texts(model, encoder, ["う" * 3, "え" * 9, "お", "か" * 11])
    score_texts(model, encoder, ["く" * 2, "け" * 4, "こ" * 6])
    assert score._gold_logprobs._cache_size() == before
