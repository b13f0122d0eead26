"""Generation with the key/value cache: equal to recomputing the whole forward, compiled once per
bucket, the sampling rules, streaming whole characters, and ``jagpt generate`` on a registered checkpoint."""

from __future__ import annotations

import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import decode
from model.config import ModelConfig
from model.decode import Decoder, Sampling, bucket, candidates
from model.generate import TextStream, generate_samples, sample_ids
from model.gpt import GPT
from tests.registered import jagpt_env, registered

CFG = ModelConfig(vocab_size=97, seq_len=32, n_layer=2, d_model=32, n_head=4)
EOT = 96


@pytest.fixture(scope="module")
def model():
    return GPT(CFG, nnx.Rngs(3))


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return registered(tmp_path_factory)


def recomputed_greedy(model: GPT, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding by running the whole forward pass over the context at every step; when the
    context is full, it starts again from the most recent half (the decoder's rule)."""
    ids, start, out, logits = list(prompt), 0, [], []
    ctx = model.cfg.seq_len
    forward = nnx.jit(lambda m, x: m(x))  # the whole window, padded to the context (causal: the padding is not seen)
    for _ in range(n):
        if len(ids) - start > ctx:
            start = len(ids) - ctx // 2
        window = np.zeros((1, ctx), np.int32)
        window[0, : len(ids) - start] = ids[start:]
        z = np.asarray(forward(model, window))[0, len(ids) - start - 1]
        logits.append(z)
        out.append(int(np.argmax(z)))
        ids.append(out[-1])
    return out, logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_greedy_decoding_equals_recomputing_the_whole_forward(model, dtype):
    model = nnx.clone(model)
    model.compute_dtype = dtype
    prompt = [5, 17, 3, 44, 9, 60, 2]
    n = 70  # crosses the 32-token context twice, so the refill is checked too
    got, got_logits = [], []
    for tokens, logits in Decoder(model).generate(prompt, n, EOT, Sampling(temperature=0), return_logits=True):
        got.append(int(tokens[0]))
        got_logits.append(logits[0])
    want, want_logits = recomputed_greedy(model, prompt, n)
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n)
    if dtype == "float32":
        assert got == want
    tol = 1e-4 if dtype == "float32" else 5e-2
    for i in range(min(first + 1, n)):  # the same context so far: the same logits
        np.testing.assert_allclose(got_logits[i], want_logits[i], atol=tol, rtol=tol, err_msg=f"step {i}")
    if first < n:  # bfloat16 rounds differently in the two paths: they may part only at a near tie
        top2 = np.sort(want_logits[first])[-2:]
        assert top2[1] - top2[0] < 2 * tol, (first, top2)


def test_each_shape_bucket_compiles_once():
    # a shape of its own, so that no other test compiled these programs before
    decoder = Decoder(GPT(ModelConfig(vocab_size=89, seq_len=32, n_layer=1, d_model=16, n_head=2), nnx.Rngs(0)))
    list(decoder.generate([1, 2, 3], 5, 88, Sampling(top_k=40)))  # buckets: prompt 16, cache 16
    before = decode.decode_step._cache_size(), decode.prefill._cache_size()
    # other prompts, lengths, seeds and sampling values in the same buckets: nothing new to compile
    for prompt, seed, s in (([4] * 9, 1, Sampling(top_k=33, temperature=0.7)), ([7, 8], 2, Sampling(top_k=64, top_p=0.5))):
        steps = list(decoder.generate(prompt, 16 - len(prompt), 88, s, seed=seed))
        assert len(steps) >= 1
    assert (decode.decode_step._cache_size(), decode.prefill._cache_size()) == before
    # a longer generation: one more cache bucket (32), one program for all of its steps
    steps = list(decoder.generate([1, 2, 3], 28, 88, Sampling(temperature=0, min_new_tokens=28)))
    assert len(steps) == 28
    assert decode.decode_step._cache_size() == before[0] + 1


def test_buckets_and_candidates():
    assert [bucket(n, 2048) for n in (1, 16, 17, 100, 1000, 2048)] == [16, 16, 32, 128, 1024, 2048]
    assert bucket(90, 64 + 32) == 96  # never beyond the context
    with pytest.raises(ValueError):
        bucket(97, 96)
    assert (candidates(0, 500), candidates(40, 500), candidates(1, 500), candidates(499, 500)) == (500, 64, 1, 500)


def draws(logits, n=2000, **knobs):
    logits = jnp.asarray(np.tile(np.asarray(logits, np.float32), (n, 1)))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n))
    k_cap = candidates(knobs.get("top_k", 0), logits.shape[1])
    s = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **knobs}
    return np.asarray(decode.sample(logits, keys, jnp.float32(s["temperature"]), jnp.int32(s["top_k"]),
                                    jnp.float32(s["top_p"]), k_cap))


def test_sampling_rules():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = np.log(probs)
    counts = np.bincount(draws(logits), minlength=5) / 2000
    np.testing.assert_allclose(counts, probs, atol=0.04)  # temperature 1, nothing cut: the model's distribution
    assert set(draws(logits, temperature=0)) == {1}  # greedy
    assert set(draws(logits, top_k=1)) == {1}
    assert set(draws(logits, top_k=2)) == {1, 3}
    assert set(draws(logits, top_k=3)) == {1, 3, 4}
    assert set(draws(logits, top_p=0.5)) == {1, 3}  # 0.4 < 0.5, 0.4 + 0.3 reaches it
    assert set(draws(logits, top_p=0.3)) == {1}
    assert set(draws(logits, top_k=3, top_p=0.9)) == {1, 3, 4}
    cold = np.bincount(draws(logits, temperature=0.3), minlength=5) / 2000
    assert cold[1] > 0.6  # a low temperature sharpens the distribution
    for bad in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_new_tokens": -1}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_stops_at_end_of_text_unless_min_new_tokens(model):
    first = next(sample_ids(model, [5, 6, 7], 1, EOT, temperature=0))
    # the greedy first token made the end token: the generation ends at once
    assert list(sample_ids(model, [5, 6, 7], 10, eot_id=first, temperature=0)) == []
    got = list(sample_ids(model, [5, 6, 7], 10, eot_id=first, temperature=0, min_new_tokens=4))
    assert len(got) >= 4 and first not in got[:4]


def test_rows_of_a_batch_are_the_samples_drawn_alone(model):
    decoder = Decoder(model)
    together = np.stack(list(decoder.generate([3, 1, 4], 12, EOT, Sampling(top_k=0, min_new_tokens=12), seed=7, rows=(0, 1, 2))))
    alone = np.stack(list(decoder.generate([3, 1, 4], 12, EOT, Sampling(top_k=0, min_new_tokens=12), seed=7, rows=(1,))))
    np.testing.assert_array_equal(together[:, 1], alone[:, 0])
    assert not np.array_equal(together[:, 0], together[:, 1])  # each row its own key


def test_streamed_pieces_are_whole_characters(reg):
    encoder = reg.encoder
    text = "むかし𠮷野家🍣ｶﾀｶﾅ\n　終わり"  # characters the 1200-token vocabulary spells in bytes
    ids = encoder.encode(text)
    assert any(encoder.tokenizer.id_to_token(i).startswith("<0x") for i in ids)
    stream = TextStream(encoder)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)
    # a byte token alone is held back until its character is complete
    first_byte = next(k for k, i in enumerate(ids) if encoder.tokenizer.id_to_token(i).startswith("<0x"))
    assert pieces[first_byte] == ""


def test_generate_samples_streams_each_row(reg):
    from flows.stages import load_checkpoint

    record, encoder, model = load_checkpoint(reg.storage, reg.ref)
    seen: dict[int, str] = {0: "", 1: ""}
    texts = generate_samples(model, encoder, "むかし", 20, Sampling(top_k=40), seed=1, rows=(0, 1),
                             on_text=lambda i, piece: seen.__setitem__(i, seen[i] + piece))
    assert [seen[0], seen[1]] == texts and texts[0] != texts[1]


def jagpt(reg, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--config", str(reg.config)],
                          capture_output=True, text=True, timeout=180, env=jagpt_env())


class Recorder(io.StringIO):
    """A stdout that remembers each write, to see the text arrive piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def run_cli(reg, monkeypatch, *args: str, stdin: str = "") -> tuple[int, Recorder, str]:
    from flows.cli import main

    out, err = Recorder(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = main([*args, "--config", str(reg.config)])
    monkeypatch.undo()
    return code, out, err.getvalue()


def test_jagpt_generate_streams_from_the_newest_checkpoint(reg, monkeypatch):
    done = jagpt(reg, "generate", "--prompt", "むかし、むかし", "--max-new-tokens", "30", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("むかし、むかし") and len(done.stdout) > len("むかし、むかし\n")
    assert f"checkpoint {reg.ref}" in done.stderr  # the newest registered one

    code, out, err = run_cli(reg, monkeypatch, "generate", "--prompt-file", "-", "--max-new-tokens", "30", "--seed", "1",
                             "--checkpoint", reg.ref, stdin="むかし、むかし\n")
    assert code == 0, err
    assert out.getvalue() == done.stdout  # the same prompt (one trailing newline dropped), seed and checkpoint
    pieces = out.writes[1:-1]  # between the prompt and the final newline: the text as it was generated
    assert len(pieces) > 3 and all(pieces)  # (an undertrained model may sample stray bytes: U+FFFD is right there)

    code, out, err = run_cli(reg, monkeypatch, "generate", "--prompt", "町", "--num-samples", "2", "--top-p", "0.9",
                             "--temperature", "0.8", "--max-new-tokens", "15")
    assert code == 0, err
    text = out.getvalue()
    assert "=== sample 1 of 2 ===\n町" in text and "=== sample 2 of 2 ===\n町" in text
    first, second = (part.split("\n", 1)[1] for part in text.split("=== sample ")[1:])
    assert first.strip() != second.strip()

    for bad in (["--top-p", "0"], ["--max-new-tokens", "0"], ["--prompt-file", "/nonexistent/prompt.txt"],
                ["--temperature", "-1"], ["--prompt", "a", "--prompt-file", "-"]):
        code, out, err = run_cli(reg, monkeypatch, "generate", *bad)
        assert code == 2 and err.startswith("jagpt generate:"), (bad, err)
    code, out, err = run_cli(reg, monkeypatch, "generate", "--checkpoint", "run-nope")
    assert code == 1 and "no registered checkpoint 'run-nope'" in err
