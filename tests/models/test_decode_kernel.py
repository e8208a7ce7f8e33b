"""The dense decoder runs decode steps as one fused kernel call over all its layers
(`decode_layers`), and the engine's results are bit for bit those of each layer's operators
called one by one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from glmv import kernels
from glmv.models.glm4v import Glm4vTextModel
from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor
from glmv.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine

pytestmark = pytest.mark.skipif(
    kernels.get_ops() is None or not kernels.get_ops().bf16_linear_native(),
    reason="glmv's CPU kernels with AVX-512 products are not available here")

KERNEL = Glm4vTextModel._decode_stack


def _run(processor: Any, model: Any, monkeypatch: pytest.MonkeyPatch, fused: bool
         ) -> tuple[list[Any], int]:
    calls = 0

    def counted(self: Any, *args: Any) -> torch.Tensor | None:
        nonlocal calls
        out = KERNEL(self, *args) if fused else None
        calls += out is not None
        return out

    monkeypatch.setattr(Glm4vTextModel, "_decode_stack", counted)
    prompts = [processor.process("Hello there, " * n) for n in (1, 3, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    engine = make_engine(processor, model, kv_cache_memory=0.01)
    return run_engine(engine, prompts, params), calls


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_fused_decode_layer_equals_the_layer_op_by_op(quantization: str | None,
                                                      tiny_checkpoint: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tiny_checkpoint("glm-4.6v-flash")
    processor = MultiModalProcessor.from_pretrained(ckpt)
    model = load_model(ckpt, dtype=torch.bfloat16, progress=False, quantization=quantization)
    plain, _ = _run(processor, model, monkeypatch, fused=False)
    fused, calls = _run(processor, model, monkeypatch, fused=True)
    # decode steps 2..6 of the three requests, batched together; not the prefill step
    assert calls == 5
    for a, b in zip(plain, fused, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # the same bits


def test_plain_weights_keep_the_layer_op_by_op(tiny_checkpoint: Any) -> None:
    """Without glmv's packed weights (a float32 model, or oneDNN's layout) there is no
    fused call: decode_layers takes only glmv's blocks."""
    ckpt = tiny_checkpoint("glm-4.6v-flash")
    model = load_model(ckpt, dtype=torch.float32, progress=False)
    layer = model.model.language_model.layers[0]
    assert layer._kernel_args() is None
    assert model.model.language_model._stack_args() is None


def test_swiglu_pairs_give_the_bits_of_gate_up_then_silu(tiny_checkpoint: Any,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The decoder's gate_up is packed in SwiGLU pairs (silu(gate) * up out of one pass, in
    prefill and in decode_layers); with the usual [gate | up] blocks and silu_and_mul after
    them the engine's tokens and logprobs are the same bits."""
    from glmv.layers.linear import Bf16Blocks, pack_linear_weights

    ckpt = tiny_checkpoint("glm-4.6v-flash")
    processor = MultiModalProcessor.from_pretrained(ckpt)
    model = load_model(ckpt, dtype=torch.bfloat16, progress=False)
    pack_linear_weights(model)  # as the engine's executor does
    layers = model.model.language_model.layers
    assert all(layer.mlp.gate_up_proj.packed.swiglu for layer in layers)
    assert all(layer._kernel_args()[4] for layer in layers)
    pairs, _ = _run(processor, model, monkeypatch, fused=True)
    for layer in layers:
        packed = layer.mlp.gate_up_proj.packed
        layer.mlp.gate_up_proj.packed = Bf16Blocks.pack(packed.rows(), None)
    assert not any(layer._kernel_args()[4] for layer in layers)
    usual, calls = _run(processor, model, monkeypatch, fused=True)
    assert calls == 5
    for a, b in zip(pairs, usual, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_the_stack_is_made_again_when_a_weight_or_cache_is_replaced(tiny_checkpoint: Any
                                                                   ) -> None:
    """decode_layers' flat arguments are made once and kept; a layer's packed weight or KV
    cache replaced (weights packed again, the cache allocated again) makes them anew."""
    from glmv.layers.linear import Bf16Blocks, pack_linear_weights

    ckpt = tiny_checkpoint("glm-4.6v-flash")
    model = load_model(ckpt, dtype=torch.bfloat16, progress=False)
    pack_linear_weights(model)
    text = model.model.language_model
    assert text._stack_args() is None  # no KV cache bound yet
    for layer in text.layers:
        layer.self_attn.attn.kv_cache = torch.zeros(2, 4, 16, layer.self_attn.num_kv_heads,
                                                    layer.self_attn.head_dim,
                                                    dtype=torch.bfloat16)
    stack = text._stack_args()
    assert stack is not None and text._stack_args() is stack  # kept
    assert len(stack.kv_caches) == len(text.layers) and len(stack.norms) == 4 * len(text.layers)
    assert sum(stack.product_sizes) == len(stack.products)

    last = text.layers[-1]
    down = last.mlp.down_proj
    down.packed = Bf16Blocks.pack(down.packed.rows(), None)
    renewed = text._stack_args()
    assert renewed is not stack and renewed is not None
    assert any(p is down.packed.blocks for p in renewed.products)
    assert not any(p is down.packed.blocks for p in stack.products)

    cache = torch.zeros_like(last.self_attn.attn.kv_cache)
    last.self_attn.attn.kv_cache = cache
    again = text._stack_args()
    assert again is not renewed and again is not None and again.kv_caches[-1] is cache
