"""--quantization int8 (W8A8): the VNNI kernel computes exactly the quantized product its
PyTorch reference describes, the quantized product stays close to the float one, and a
quantized model's logits stay close to the bf16 model's (random tiny models, so the bounds
are about the scheme, not a language)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from glmv.errors import ConfigError
from glmv.kernels import NEVER, get_ops
from glmv.layers import quantization
from glmv.layers.linear import Linear
from glmv.layers.quantization import Int8Weight, check_quantization
from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor
from tests.helpers import glmv_logits

needs_kernels = pytest.mark.skipif(get_ops() is None, reason="glmv's CPU kernels did not build")
BF16_ULP = 2.0**-7  # relative spacing of bfloat16 numbers


def _layer(out_features: int, in_features: int, bias: bool, seed: int) -> Int8Weight:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    b = torch.randn(out_features, generator=generator).bfloat16() if bias else None
    return Int8Weight.quantize(weight, b)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 16, 19, 70, 300])
@pytest.mark.parametrize("out_features, in_features, bias", [
    (32, 64, False), (96, 100, True), (17, 3, True), (130, 302, False), (64, 4096, True)])
def test_kernel_computes_the_reference(rows: int, out_features: int, in_features: int,
                                       bias: bool, product_path: str) -> None:
    layer = _layer(out_features, in_features, bias, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = layer.apply(x)
    want = layer.reference(x, layer.bias)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    # The same integers, scales and order of rounding up to float32 vs float64 before the last
    # rounding to bf16: at most one bf16 step apart.
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_ULP, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("rows, in_features", [(1500, 1024), (8200, 4096), (5, 1024)])
def test_kernel_over_panels_and_row_buffers(rows: int, in_features: int,
                                            product_path: str) -> None:
    """Several panels of rows, quantized rows beyond the 32 MiB buffer a thread keeps, and a
    short product reusing the kept buffer: the reference's product each time."""
    layer = _layer(24, in_features, True, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    torch.testing.assert_close(layer.apply(x).float(), layer.reference(x, layer.bias).float(),
                               rtol=BF16_ULP, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("rows", [5, 20])
def test_kernel_takes_strided_rows(rows: int, product_path: str) -> None:
    """Rows of a wider tensor (quantized from their stride, into tiles from 16 rows on AMX)
    give the bits of the same rows made contiguous."""
    layer = _layer(40, 300, True, seed=rows)
    wide = torch.randn(rows, 340, generator=torch.Generator().manual_seed(4)).bfloat16()
    x = wide[:, 20:320]
    assert torch.equal(layer.apply(x), layer.apply(x.contiguous()))


@needs_kernels
def test_amx_and_vnni_products_are_bit_equal() -> None:
    """The integer sums are exact and both epilogues round alike: the kernel a batch takes
    (by its row count) does not change a single bit."""
    ops = get_ops()
    if not ops.linear_amx():
        pytest.skip("this CPU (or this build of the kernels) has no AMX tiles")
    layer = _layer(200, 1000, True, seed=5)
    x = torch.randn(70, 1000, generator=torch.Generator().manual_seed(2)).bfloat16()
    previous = ops.linear_amx_rows(NEVER, NEVER)
    try:
        lanes = layer.apply(x)
        ops.linear_amx_rows(NEVER, 1)
        assert torch.equal(layer.apply(x), lanes)
    finally:
        ops.linear_amx_rows(*previous)


@needs_kernels
def test_row_parallel_bias_is_left_out_on_request() -> None:
    layer = _layer(48, 64, True, seed=3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert layer.bias is not None
    torch.testing.assert_close(layer.apply(x, with_bias=False).float(),
                               layer.reference(x, None).float(), rtol=BF16_ULP, atol=1e-6)
    assert not torch.allclose(layer.apply(x).float(), layer.reference(x, None).float(),
                              rtol=BF16_ULP)


def test_weights_round_trip_and_pad() -> None:
    weight = torch.randn(21, 10, generator=torch.Generator().manual_seed(0))
    layer = Int8Weight.quantize(weight.bfloat16(), None)
    assert layer.blocks.shape == (2, 16, 16, 4)  # N 21 -> 32 channels, K 10 -> 64 inputs
    assert layer.rows().shape == (21, 10)
    scale = weight.bfloat16().float().abs().amax(dim=1) / 127
    assert torch.all((layer.dequantized() - weight.bfloat16().float()).abs()
                     <= scale[:, None] / 2 + 1e-6)
    assert layer.row_sum[:21].tolist() == layer.rows().sum(dim=1).tolist()


def test_quantized_product_is_close_to_the_float_one() -> None:
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = Int8Weight.quantize(weight, None).apply(x).float()
    exact = x.float() @ weight.float().t()
    assert (y - exact).norm() / exact.norm() < 0.02  # ~1.2% for Gaussian weights and inputs


def test_without_kernels_the_reference_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "get_ops", lambda: None)
    layer = _layer(40, 70, True, seed=5)
    x = torch.randn(2, 3, 70, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert torch.equal(layer.apply(x), layer.reference(x.reshape(6, 70), layer.bias).view(2, 3, 40))


def test_refused_where_it_does_not_run() -> None:
    check_quantization(None, torch.float32, torch.device("cuda"))  # nothing asked: nothing to check
    check_quantization("int8", torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ConfigError, match="CPU only"):
        check_quantization("int8", torch.bfloat16, torch.device("cuda"))
    with pytest.raises(ConfigError, match="bfloat16"):
        check_quantization("int8", torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown quantization"):
        check_quantization("fp4", torch.bfloat16, torch.device("cpu"))


@needs_kernels
@pytest.mark.parametrize("variant, min_cosine, min_top1", [
    # Dense: every position's logits keep their direction.
    ("glm-4.1v-thinking", 0.998, 0.9),
    # MoE: an expert choice flipped by the rounding changes a position's output more, so the
    # bound is on the mean over positions (measured: min 0.92, mean 0.997).
    ("glm-4.5v", 0.99, 0.9),
])
def test_int8_model_stays_close_to_bf16(variant: str, min_cosine: float, min_top1: float,
                                        tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint(variant)
    processor = MultiModalProcessor.from_pretrained(checkpoint)
    prompt = processor.process_chat([{"role": "user", "content":
                                      "Tell me a long story about quantized tensors and scales."}])
    bf16 = load_model(checkpoint, dtype="bfloat16", progress=False)
    int8 = load_model(checkpoint, dtype="bfloat16", progress=False, quantization="int8")
    decoder = int8.model.language_model
    linears = [m for m in decoder.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.packed, Int8Weight) and m.weight.numel() == 0
                           for m in linears)
    assert isinstance(int8.lm_head.packed, Int8Weight)
    want, got = glmv_logits(bf16, prompt), glmv_logits(int8, prompt)
    cosine = torch.nn.functional.cosine_similarity(want, got, dim=-1)
    if variant == "glm-4.1v-thinking":
        assert cosine.min() >= min_cosine
    else:
        assert cosine.mean() >= min_cosine
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= min_top1


@needs_kernels
@pytest.mark.parametrize("variant, min_cosine, mean_cosine", [
    # measured: dense min 0.9956 / mean 0.9987; MoE min 0.86 (a flipped expert) / mean 0.988;
    # the vision tower's own output min 0.9989 in both
    ("glm-4.1v-thinking", 0.99, 0.998),
    ("glm-4.5v", 0.8, 0.98),
])
def test_int8_vision_tower_stays_close_to_bf16(variant: str, min_cosine: float,
                                               mean_cosine: float, tiny_checkpoint: Any) -> None:
    import numpy as np
    import PIL.Image

    checkpoint = tiny_checkpoint(variant)
    processor = MultiModalProcessor.from_pretrained(checkpoint)
    pixels = np.random.default_rng(0).integers(0, 255, (112, 140, 3), dtype=np.uint8)
    prompt = processor.process_chat([{"role": "user", "content": [
        {"type": "image", "image": PIL.Image.fromarray(pixels)},
        {"type": "text", "text": "Describe the picture in detail."}]}])
    bf16 = load_model(checkpoint, dtype="bfloat16", progress=False)
    int8 = load_model(checkpoint, dtype="bfloat16", progress=False, quantization="int8")
    linears = [m for m in int8.visual.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.packed, Int8Weight) and m.weight.numel() == 0
                           for m in linears)
    patches = torch.cat([item.pixel_values for item in prompt.mm_items])
    grids = [item.grid_thw for item in prompt.mm_items]
    with torch.inference_mode():
        vision = torch.nn.functional.cosine_similarity(
            bf16.encode_vision(patches, grids).float(), int8.encode_vision(patches, grids).float(),
            dim=-1)
    assert vision.min() >= 0.998
    cosine = torch.nn.functional.cosine_similarity(glmv_logits(bf16, prompt),
                                                   glmv_logits(int8, prompt), dim=-1)
    assert cosine.min() >= min_cosine and cosine.mean() >= mean_cosine


@needs_kernels
@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_engine_serves_an_int8_model(tensor_parallel_size: int, tiny_checkpoint: Any) -> None:
    import numpy as np
    import PIL.Image

    from glmv import LLM, SamplingParams

    image = PIL.Image.fromarray((np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3))
    conversations = [[{"role": "user", "content": "Hello there."}],
                     [{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "What is it?"}]}]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(str(tiny_checkpoint("glm-4.6v-flash")), dtype="bfloat16", quantization="int8",
             tensor_parallel_size=tensor_parallel_size, kv_cache_memory=0.05,
             max_model_len=2048, show_progress=False) as llm:
        outputs = llm.chat(conversations, params, use_tqdm=False)  # type: ignore[arg-type]
        assert isinstance(llm.llm_engine.runner.model.lm_head.packed, Int8Weight)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6]
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
