import numpy as np
import pytest
from flax import nnx

from model import checkpoint
from model.config import ModelConfig, preset
from model.generate import sample_ids
from model.gpt import GPT
from model.train import TrainSettings, batch_at, evaluate, make_optimizer, train_step

CFG = ModelConfig(vocab_size=64, seq_len=32, n_layer=2, d_model=32, n_head=4)


def test_presets_follow_the_gpt3_table():
    small = preset("small", vocab_size=50257)
    assert (small.n_layer, small.d_model, small.n_head, small.seq_len) == (12, 768, 12, 2048)
    assert 120e6 < small.n_params() < 130e6
    assert preset("13b", vocab_size=50257).d_model == 5120
    assert 12.5e9 < preset("13b", vocab_size=50257).n_params() < 13.5e9
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge", vocab_size=10)


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(vocab_size=10, seq_len=8, n_layer=1, d_model=30, n_head=4)


def test_forward_shape_and_causality():
    model = GPT(CFG, nnx.Rngs(0))
    x = np.arange(16, dtype=np.int32).reshape(1, 16) % CFG.vocab_size
    y = x.copy()
    y[0, 10:] = 0
    a, b = model(x), model(y)
    assert a.shape == (1, 16, CFG.vocab_size)
    np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-5)  # the future does not leak into the past


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = batch_at(tokens, 16, 4, seed=0, step=7)
    x2, _ = batch_at(tokens, 16, 4, seed=0, step=7)
    assert (x1 == x2).all() and (y1[:, :-1] == x1[:, 1:]).all()
    with pytest.raises(ValueError, match="fewer than seq_len"):
        batch_at(tokens[:10], 16, 4, 0, 0)


def test_training_lowers_validation_loss_and_checkpoints_restore_exactly(tmp_path):
    pattern = np.tile(np.arange(40, dtype=np.uint16) % 37, 200)
    settings = TrainSettings(seq_len=32, batch_size=8, steps=60, lr=1e-2, warmup_steps=5, eval_batches=2)
    model = GPT(CFG, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(settings), wrt=nnx.Param)
    before = evaluate(model, pattern, settings)
    for step in range(1, settings.steps + 1):
        train_step(model, optimizer, *batch_at(pattern, 32, 8, 0, step))
    after = evaluate(model, pattern, settings)
    assert after < before * 0.5

    path = checkpoint.save(str(tmp_path / "ckpt"), settings.steps, model, optimizer)
    restored = checkpoint.restore_model(path, CFG)
    x = pattern[:32][None].astype(np.int32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(restored(x)))

    out = list(sample_ids(restored, [0, 1, 2, 3], max_new_tokens=10, eot_id=63, top_k=1))
    assert out[:3] == [4, 5, 6]  # the learned pattern continues
