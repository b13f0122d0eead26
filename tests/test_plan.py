import pytest

from flows.cli import main
from model import plan
from model.config import preset
from model.plan import Recipe

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def test_tpu_slices_and_sizes():
    v4 = plan.tpu_slice("v4-8")
    assert (v4["chips"], v4["devices"], v4["device_memory"]) == (4, 4, 32 * 2**30)
    v3 = plan.tpu_slice("v3-8")
    assert (v3["chips"], v3["devices"], v3["device_memory"]) == (4, 8, 16 * 2**30)
    assert plan.tpu_slice("v5e-16")["chips"] == 16
    with pytest.raises(ValueError, match="unknown TPU slice"):
        plan.tpu_slice("v9-8")
    specs = plan.tpu_specs()
    assert specs["prices_as_of"] and specs["prices_source"].startswith("https://cloud.google.com/")
    assert {"v4", "v5e", "v5p", "v6e"} <= set(specs["types"])
    assert plan.parse_bytes("16GiB") == 16 * 2**30 and plan.parse_bytes("80GB") == 80e9
    with pytest.raises(ValueError, match="cannot read a memory size"):
        plan.parse_bytes("lots")


def test_cheaper_recipes_keep_the_global_batch():
    ladder = plan.cheaper(Recipe(micro_batch=4, grad_accum=2), seq_len=2048)
    assert [r.remat for r in ladder[:2]] == ["dots_saveable", "full"]
    assert ladder[2].compute_dtype == "bfloat16"
    assert (ladder[3].loss_chunk, ladder[3].attn_chunk) == (256, 512)
    assert ladder[4].moments == "bfloat16"
    assert all(r.micro_batch * r.grad_accum == 8 for r in ladder)
    assert (ladder[-3].micro_batch, ladder[-3].grad_dtype, ladder[-2].moments) == (1, "bfloat16", "int8")
    assert ladder[-1].optimizer == "adafactor" and ladder[-1].moments == "float32"


def test_a_setup_that_does_not_fit_gets_the_first_cheaper_recipe_that_does():
    report = plan.plan("tiny", 1, 220_000_000, ONE, micro_batch=16, grad_accum=1, vocab=256)
    first, second = report["tried"][:2]
    assert not report["fits"] and first["peak_bytes"] > report["limit_bytes"]
    assert report["first_fit"] == second and second["recipe"]["remat"] == "dots_saveable"
    assert second["peak_bytes"] <= report["limit_bytes"] and len(report["tried"]) == 2
    assert first["argument_bytes"] > 0 and first["temp_bytes"] > second["temp_bytes"]
    text = plan.format_report(report)
    assert "does not fit" in text and "FITS" in text and "TPU v5e" in text


def test_impossible_setups_are_rejected_before_compiling(capsys):
    with pytest.raises(ValueError, match="n_head 4 is not divisible by the tensor axis 8"):
        plan.plan("tiny", 8, 2**30, {"data": 1, "fsdp": 1, "tensor": 8}, vocab=256)
    with pytest.raises(ValueError, match="longer than the model's context"):
        plan.plan("tiny", 1, 2**30, ONE, seq_len=512, vocab=256)
    assert main(["plan", "--preset", "2.7b", "--devices", "4", "--device-memory", "16GiB", "--mesh", "fsdp=8"]) == 2
    assert "mesh 'fsdp=8' does not divide 4 devices" in capsys.readouterr().err


def test_gpt3_2_7b_fits_one_24gib_device_with_the_lean_recipe():
    """docs/training.md's recipe: Adafactor, full remat, bfloat16 compute, chunked loss and attention,
    micro-batch 1 and gradient accumulation up to GPT-3's 1M-token batch."""
    report = plan.plan(
        "2.7b", 1, plan.parse_bytes("24GiB"), ONE, micro_batch=1, remat="full", optimizer="adafactor",
        compute_dtype="bfloat16", loss_chunk=256, attn_chunk=512, try_cheaper=False,
    )
    assert report["fits"], plan.format_report(report)
    assert report["requested"]["recipe"]["grad_accum"] == 488 and report["batch_tokens"] == 488 * 2048
    params = preset("2.7b", vocab_size=50257).n_params()
    assert report["requested"]["argument_bytes"] == pytest.approx(4 * params, rel=0.01)  # float32 weights


def test_gpt3_13b_adamw_fits_a_tpu_v3_8_with_fsdp_says_the_tpu_compiler():
    """docs/training.md's recipe: float32 weights, AdamW with 8-bit moments, bfloat16 gradients,
    full remat, bfloat16 compute, chunked loss and attention, GPT-3's 2M-token batch; compiled by
    libtpu's XLA TPU compiler for a v3-8 topology (8 TensorCores of 16 GiB), no TPU needed."""
    v3 = plan.tpu_slice("v3-8")
    report = plan.plan(
        "13b", 8, v3["device_memory"], {"data": 1, "fsdp": 8, "tensor": 1}, micro_batch=1, remat="full",
        optimizer="adamw", moments="int8", grad_dtype="bfloat16", compute_dtype="bfloat16", loss_chunk=256,
        attn_chunk=512, tpu="v3-8", compiler="tpu", try_cheaper=False,
    )
    assert report["fits"], plan.format_report(report)
    assert report["topology"] == "v3:2x2" and report["batch_tokens"] == 976 * 2048
    params = preset("13b", vocab_size=50257).n_params()
    assert report["requested"]["argument_bytes"] == pytest.approx((4 + 1 + 1) * params / 8, rel=0.02)
    assert "the XLA TPU compiler (libtpu) for topology v3:2x2" in plan.format_report(report)


def test_the_tpu_compiler_needs_a_known_slice_and_libtpu(monkeypatch):
    with pytest.raises(ValueError, match="give --tpu"):
        plan.plan("tiny", 1, 2**30, ONE, vocab=256, compiler="tpu")
    with pytest.raises(ValueError, match="no TPU topology is known for 'v4-64'"):
        plan.plan("tiny", 32, 2**30, {"data": 1, "fsdp": 32, "tensor": 1}, vocab=256, compiler="tpu", tpu="v4-64")
    monkeypatch.setattr(plan, "_libtpu_path", lambda: None)
    with pytest.raises(ValueError, match="needs libtpu"):
        plan.plan("tiny", 8, 2**30, {"data": 1, "fsdp": 8, "tensor": 1}, vocab=256, compiler="tpu", tpu="v3-8")
