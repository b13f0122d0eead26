import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model import checkpoint, sharding, step
from model.config import GPT3_PRESETS, ModelConfig, preset
from model.generate import sample_ids
from model.gpt import GPT, attention, cast_weight, cross_entropy_sum

CFG = ModelConfig(vocab_size=64, seq_len=32, n_layer=2, d_model=32, n_head=4)
ONE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def tokens(shape, seed=0, vocab=CFG.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_presets_follow_the_gpt3_table():
    table = {  # Brown et al. 2020, table 2.1: layers, d_model, heads, batch tokens, learning rate
        "small": (12, 768, 12, 0.5e6, 6.0e-4), "medium": (24, 1024, 16, 0.5e6, 3.0e-4),
        "large": (24, 1536, 16, 0.5e6, 2.5e-4), "xl": (24, 2048, 16, 1e6, 2.0e-4),  # paper: 24 heads of 128
        "2.7b": (32, 2560, 32, 1e6, 1.6e-4), "6.7b": (32, 4096, 32, 2e6, 1.2e-4),
        "13b": (40, 5120, 40, 2e6, 1.0e-4), "175b": (96, 12288, 96, 3.2e6, 0.6e-4),
    }
    assert set(GPT3_PRESETS) == set(table)
    for name, (n_layer, d_model, n_head, batch, lr) in table.items():
        cfg = preset(name.upper(), vocab_size=50257)
        assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.seq_len) == (n_layer, d_model, n_head, 2048)
        assert GPT3_PRESETS[name][3] == pytest.approx(batch, rel=0.05) and GPT3_PRESETS[name][4] == lr
    assert 120e6 < preset("small", vocab_size=50257).n_params() < 130e6
    assert 12.5e9 < preset("13b", vocab_size=50257).n_params() < 13.5e9
    assert 170e9 < preset("175b", vocab_size=50257).n_params() < 180e9
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge", vocab_size=10)


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(vocab_size=10, seq_len=8, n_layer=1, d_model=30, n_head=4)


def test_parameter_count_matches_the_model():
    model = GPT(CFG, nnx.Rngs(0))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == CFG.n_params()
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_forward_shape_and_causality():
    model = GPT(CFG, nnx.Rngs(0))
    x = np.arange(16, dtype=np.int32).reshape(1, 16) % CFG.vocab_size
    y = x.copy()
    y[0, 10:] = 0
    a, b = model(x), model(y)
    assert a.shape == (1, 16, CFG.vocab_size) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-5)  # the future does not leak into the past
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(np.zeros((1, CFG.seq_len + 1), np.int32))


def test_c_attn_is_gpt2s_fused_qkv_head_major():
    """Reshaped to (d, 3d), c_attn's columns are [q | k | v], each heads in order, as in HF GPT-2."""
    model = GPT(CFG, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 5, CFG.d_model))
    kernel = model.blocks.c_attn.kernel[0]
    fused = x @ kernel.reshape(CFG.d_model, 3 * CFG.d_model)
    q = fused[..., : CFG.d_model].reshape(1, 5, CFG.n_head, CFG.d_head)
    np.testing.assert_allclose(q[:, :, 1], x @ kernel[:, 0, CFG.d_head : 2 * CFG.d_head], rtol=1e-5, atol=1e-6)


def test_attention_in_query_chunks_equals_whole():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8)) for i in range(3))
    value_and_grad = jax.jit(jax.value_and_grad(lambda q, chunk: attention(q, k, v, chunk).sum()), static_argnums=1)
    (whole, g), (chunked, g_chunked) = value_and_grad(q, 0), value_and_grad(q, 4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    np.testing.assert_allclose(g_chunked, g, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(attention(q, k, v, chunk=4), attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_unchunked_loss_and_gradient():
    h = jax.random.normal(jax.random.key(0), (2, 16, 8))
    wte = jax.random.normal(jax.random.key(1), (50, 8))
    y = tokens((2, 16), vocab=50)
    logits = jnp.einsum("btd,vd->btv", h, wte)
    reference = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    np.testing.assert_allclose(cross_entropy_sum(h, wte, y), reference, rtol=1e-5)
    np.testing.assert_allclose(cross_entropy_sum(h, wte, y, chunk=4), reference, rtol=1e-5)
    grads = jax.grad(cross_entropy_sum, argnums=(0, 1))
    for a, b in zip(grads(h, wte, y, 4), grads(h, wte, y, 0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        cross_entropy_sum(h, wte, y, chunk=5)


def test_weights_cast_to_bfloat16_exactly_as_astype():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-30, 30, 100_000)).astype(np.float32)
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38, 1.0 + 2**-8], np.float32)])
    bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))  # noqa: E731
    x = jnp.asarray(x)
    np.testing.assert_array_equal(bits(cast_weight(x, jnp.bfloat16)), bits(x.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(cast_weight(x, jnp.float32), x)


def grads_of(settings: step.OptimSettings, x, y):
    model = step.build_model(CFG, settings, nnx.Rngs(0))
    return nnx.jit(step.loss_and_grads, static_argnums=3)(model, x, y, settings.grad_dtype)


def test_accumulated_micro_batches_give_the_full_batch_loss_and_gradient():
    x, y = tokens((8, 16), 1), tokens((8, 16), 2)
    loss, grads = grads_of(step.OptimSettings(), x[None], y[None])
    for remat, accum in (("none", 4), ("dots_saveable", 1), ("full", 1), ("full", 4)):
        settings = step.OptimSettings(remat=remat, loss_chunk=4, attn_chunk=8)
        got_loss, got = grads_of(settings, step.split_batch(x, accum), step.split_batch(y, accum))
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_bfloat16_gradient_accumulator_sums_close_to_float32():
    x, y = tokens((8, 16), 1), tokens((8, 16), 2)
    settings = step.OptimSettings(remat="full")
    loss, grads = grads_of(settings, step.split_batch(x, 4), step.split_batch(y, 4))
    lean = settings.model_copy(update={"grad_dtype": "bfloat16"})
    loss16, grads16 = grads_of(lean, step.split_batch(x, 4), step.split_batch(y, 4))
    np.testing.assert_allclose(loss16, loss, rtol=1e-6)
    blocks16 = jax.tree.leaves(nnx.state(grads16)["blocks"])
    assert {g.dtype for g in blocks16} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads)):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
    assert float(step.global_norm(grads16)) == pytest.approx(float(step.global_norm(grads)), rel=1e-2)


def test_bfloat16_compute_keeps_float32_parameters_and_the_loss():
    x, y = tokens((4, 16), 1), tokens((4, 16), 2)
    loss32, _ = grads_of(step.OptimSettings(), x[None], y[None])
    loss16, grads16 = grads_of(step.OptimSettings(compute_dtype="bfloat16", remat="full"), x[None], y[None])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_optimizer_settings():
    settings = step.OptimSettings(lr=1e-3, warmup_steps=10, total_steps=110)
    schedule = step.make_schedule(settings)
    assert schedule(0) == 0 and schedule(10) == pytest.approx(1e-3) and schedule(110) == pytest.approx(1e-4)
    model = GPT(CFG, nnx.Rngs(0))
    mask = step.decay_mask(nnx.state(model, nnx.Param))
    decayed = {"/".join(str(k.key) for k in path[:-1]) for path, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert decayed == {"wte", "wpe", "blocks/c_attn/kernel", "blocks/attn_proj/kernel", "blocks/c_fc/kernel", "blocks/mlp_proj/kernel"}

    lean = step.LayerwiseOptimizer(model, step.OptimSettings(moments="bfloat16"))
    adam = lean.opt_state[1].blocks[0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    leaner = step.LayerwiseOptimizer(model, step.OptimSettings(moments="int8"))
    adam = leaner.opt_state[1].blocks[0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.int8)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.uint8)}
    n_params = CFG.n_params()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(leaner.opt_state)))
    assert 2 * n_params < state_bytes < 2.3 * n_params  # 1 + 1 bytes, and a float32 per block of at most 128


def test_8bit_codes_keep_the_moments_within_their_resolution():
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-6, 0, (4, 256))
    signs = rng.choice([-1.0, 1.0], (4, 256))
    for x, power, signed in ((signs * magnitudes, 2, True), (magnitudes**2, 4, False)):
        x = x.astype(np.float32)
        x[0, :128] = 0.0  # an all-zero block
        codes, scale = step.quantize(jnp.asarray(x), power, signed)
        assert codes.dtype == (jnp.int8 if signed else jnp.uint8) and scale.shape == (4, 2)
        back = np.asarray(step.dequantize(codes, scale, power))
        np.testing.assert_array_equal(back[0, :128], 0.0)
        assert np.all(np.sign(back) * np.sign(x) >= 0)
        # a code step of 1/levels in (|x| / max)^(1/power) is a relative step of power / levels / that root
        unit = np.abs(x) / np.repeat(np.asarray(scale), 128, axis=1).clip(1e-30)
        root = unit ** (1 / power)
        levels = 127 if signed else 255
        resolved = root > 0.05
        bound = power * (0.5 / levels) / root[resolved] * 1.05
        assert np.all(np.abs(back - x)[resolved] <= bound * np.abs(x)[resolved] + 1e-12)


def test_8bit_adamw_trains_like_float32_adamw():
    x, y = tokens((8, 32), 3), tokens((8, 32), 4)
    losses = {}
    for moments in ("float32", "int8"):
        settings = step.OptimSettings(moments=moments, lr=3e-3, warmup_steps=0, total_steps=40)
        model = step.build_model(CFG, settings, nnx.Rngs(0))
        optimizer = step.LayerwiseOptimizer(model, settings)
        losses[moments] = [float(step.train_step(model, optimizer, x, y)["loss"]) for _ in range(40)]
    fp32, int8 = np.array(losses["float32"]), np.array(losses["int8"])
    assert fp32[-1] < 0.7 * fp32[0]
    np.testing.assert_allclose(int8, fp32, rtol=1e-2)


@pytest.mark.parametrize("kind", ["adamw", "adamw-bf16", "adamw-int8", "adafactor"])
def test_layer_by_layer_update_equals_the_whole_tree_update(kind):
    moments = {"adamw-bf16": "bfloat16", "adamw-int8": "int8"}.get(kind, "float32")
    settings = step.OptimSettings(
        optimizer="adafactor" if kind == "adafactor" else "adamw", moments=moments,
        lr=1e-2, warmup_steps=0, grad_clip=0.05,
    )
    model = GPT(CFG, nnx.Rngs(0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), nnx.state(model, nnx.Param))
    twin = nnx.clone(model)
    fast, plain = step.LayerwiseOptimizer(model, settings), step.LayerwiseOptimizer(twin, settings)
    layerwise = nnx.jit(lambda opt, m, g: opt.update(m, g))
    whole_tree = nnx.jit(lambda opt, m, g: nnx.Optimizer.update(opt, m, g))  # optax's own update of the same chain
    for _ in range(2):
        layerwise(fast, model, grads)
        whole_tree(plain, twin, grads)
    # stored moments may round one step apart (the clip is one scalar factor here, a divide in optax)
    atol, state_tol = {"bfloat16": (1e-4, (1e-2, 1e-4)), "int8": (1e-4, (0, 1.0))}.get(moments, (1e-7, (1e-5, 1e-7)))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(twin))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
    for a, b in zip(jax.tree.leaves(nnx.state(fast)), jax.tree.leaves(nnx.state(plain))):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=state_tol[0], atol=state_tol[1])


def test_flops_per_token():
    cfg = preset("small", vocab_size=50257)
    matmul_params = 12 * (12 * 768**2 + 13 * 768) + 50257 * 768
    assert step.flops_per_token(cfg, 1024) == 6 * matmul_params + 12 * 12 * 768 * 1024


def test_impossible_setups_are_rejected_before_compiling():
    settings = step.OptimSettings(grad_accum=3)
    with pytest.raises(ValueError, match="n_head 4 is not divisible by the tensor axis 8"):
        step.check_config(CFG, settings, {"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(ValueError, match="d_model 32 is not divisible by the fsdp axis 64"):
        step.check_config(CFG, settings, {"data": 1, "fsdp": 64, "tensor": 1})
    with pytest.raises(ValueError, match="not divisible by data x fsdp x grad_accum = 2 x 1 x 3"):
        step.check_batch(CFG, settings, {"data": 2, "fsdp": 1, "tensor": 1}, 8, 16)
    with pytest.raises(ValueError, match="longer than the model's context"):
        step.check_batch(CFG, settings, {"data": 1, "fsdp": 1, "tensor": 1}, 3, 64)
    with pytest.raises(ValueError, match="attn_chunk 5 does not divide"):
        step.check_batch(CFG, step.OptimSettings(attn_chunk=5), {"data": 1, "fsdp": 1, "tensor": 1}, 3, 16)
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        step.split_batch(np.zeros((6, 4)), 4)


def windows(data: np.ndarray, seq_len: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.random.default_rng(seed).integers(0, len(data) - seq_len, size=batch)
    w = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return w[:, :-1], w[:, 1:]


def test_training_lowers_validation_loss_and_checkpoints_restore_exactly(tmp_path):
    pattern = np.tile(np.arange(40, dtype=np.uint16) % 37, 200)
    settings = step.OptimSettings(lr=1e-2, warmup_steps=5, total_steps=60, grad_accum=2, remat="full")
    model, optimizer = step.create_train_state(CFG, settings, ONE, seed=0)

    def val_loss() -> float:
        total, n = step.eval_step(model, *windows(pattern, 32, 8, seed=10_000))
        return float(total) / int(n)

    before = val_loss()
    for i in range(1, settings.total_steps + 1):
        x, y = windows(pattern, 32, 8, seed=i)
        metrics = step.train_step(model, optimizer, step.split_batch(x, 2), step.split_batch(y, 2))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert val_loss() < before * 0.5
    assert int(optimizer.step[...]) == settings.total_steps

    path = checkpoint.save(str(tmp_path / "ckpt"), settings.total_steps, model, optimizer)
    restored = checkpoint.restore_model(path, CFG)
    x = pattern[:32][None].astype(np.int32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(restored(x)))

    out = list(sample_ids(restored, [0, 1, 2, 3], max_new_tokens=10, eot_id=63, top_k=1))
    assert out[:3] == [4, 5, 6]  # the learned pattern continues
