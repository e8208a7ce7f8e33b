"""Build a model from a checkpoint folder: validate, read shard by shard, map names, convert.

1. The checkpoint's tensor names and shapes (from the safetensors headers, no data read) are
   checked against `expected_tensors(config)`: one WeightMismatchError names every missing or
   unexpected tensor and every shape mismatch.
2. The model is built directly in the target dtype on the target device (no random init).
3. Each tensor is mapped onto its parameter (packed q/k/v, gate/up, stacked experts), whose
   loader keeps this rank's slice of it; only that slice is read (`LazyTensor`), FP8 blocks
   are dequantized (`weight * weight_scale_inv` per block), and it is cast.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from glmv.checkpoint import (
    CheckpointReader,
    Fp8Blocks,
    LazyTensor,
    LoadedTensor,
    expected_tensors,
    torch_dtype,
)
from glmv.config import ModelConfig, QuantizationConfig
from glmv.errors import CheckpointError, WeightMismatchError
from glmv.layers.linear import ShapeMismatch, copy_checked
from glmv.layers.quantization import check_quantization, quantize_linear_layers
from glmv.models.glm4v import Glm4vForConditionalGeneration, WeightRule
from glmv.models.registry import model_class

_SCALE_SUFFIX = ".weight_scale_inv"
# Tensors some exports carry that the model never uses.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig) -> torch.dtype:
    """'auto' = the checkpoint's dtype (FP8 checkpoints compute in bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(cfg.dtype if dtype == "auto" else dtype)


def validate_checkpoint(reader: CheckpointReader, cfg: ModelConfig) -> None:
    """Compare names/shapes in the files with the config's layout, before reading any data."""
    expected = {name: shape for name, shape, _ in expected_tensors(cfg)}
    present = {n: s for n, s in reader.shapes.items() if not _IGNORED.search(n)}
    scales = {n for n in present if n.endswith(_SCALE_SUFFIX)}
    missing = [n for n in expected if n not in present]
    unexpected = [n for n in present if n not in expected and n not in scales]
    unexpected += [n for n in scales if n[: -len(_SCALE_SUFFIX)] + ".weight" not in expected]
    mismatches = [(n, present[n], expected[n]) for n in expected
                  if n in present and present[n] != expected[n]]
    for name in scales:
        weight = name[: -len(_SCALE_SUFFIX)] + ".weight"
        if weight in expected and cfg.quantization is not None:
            block = cfg.quantization.weight_block_size
            rows, cols = expected[weight][:2]
            want = (-(-rows // block[0]), -(-cols // block[1]))
            if present[name] != want:
                mismatches.append((name, present[name], want))
    if missing or unexpected or mismatches:
        raise WeightMismatchError(missing, unexpected, mismatches, str(reader.root))
    fp8 = [n for n, d in reader.dtypes.items() if d.startswith("F8")]
    unscaled = [n for n in fp8 if n[: -len(".weight")] + _SCALE_SUFFIX not in present]
    if unscaled:
        raise CheckpointError(f"FP8 tensors without a weight_scale_inv: {unscaled}")
    if (fp8 or scales) and cfg.quantization is None:
        # Scales without a block size cannot be applied: say so instead of guessing.
        what = "FP8 tensors" if fp8 else f"weight_scale_inv tensors ({sorted(scales)[0]}, ...)"
        raise CheckpointError(f"the checkpoint has {what} but config.json has no "
                              "quantization_config")


def iter_weights(reader: CheckpointReader, quant: QuantizationConfig | None,
                 progress: bool) -> Iterator[tuple[str, LazyTensor]]:
    """(name, lazy tensor) for every weight, FP8 ones paired with their scales (not yielded).

    Nothing is read here: the parameters' loaders read what they keep. The bar counts the
    checkpoint's bytes as its tensors are dealt with (a rank reads only part of them).
    """
    bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, desc="Loading weights",
               disable=not progress, leave=False)
    with contextlib.closing(bar):
        for path, names in reader.names_by_file():
            for name in names:
                if not (name.endswith(_SCALE_SUFFIX) or _IGNORED.search(name)):
                    yield name, reader.lazy(name, _fp8_blocks(reader, name, quant))
                bar.update(reader.nbytes[name])
            bar.update(path.stat().st_size - sum(reader.nbytes[n] for n in names))  # header


def _fp8_blocks(reader: CheckpointReader, name: str,
                quant: QuantizationConfig | None) -> Fp8Blocks | None:
    """How weight `name` dequantizes: by its weight_scale_inv, if it has one."""
    scale_name = name[: -len(".weight")] + _SCALE_SUFFIX
    if not (name.endswith(".weight") and scale_name in reader.locations):
        return None
    assert quant is not None  # validate_checkpoint refuses scales without a block size
    return Fp8Blocks(scale_name, quant.weight_block_size)


def _map_name(name: str, rules: list[WeightRule]) -> tuple[str, object]:
    for r in rules:
        match = r.pattern.match(name)
        if match:
            return match.expand(r.target), r.shard(match)
    return name, None


def load_weights(model: Glm4vForConditionalGeneration,
                 weights: Iterator[tuple[str, LoadedTensor]]) -> None:
    """Copy checkpoint tensors into parameters; every parameter shard must be filled once."""
    params = dict(model.named_parameters())
    filled: set[tuple[str, object]] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        target, shard = _map_name(name, model.weight_rules)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            try:
                if loader is None:
                    copy_checked(param.data, tensor)
                else:
                    loader(param, tensor, shard)
            except ShapeMismatch as exc:
                raise WeightMismatchError([], [], [(name, exc.got, exc.want)]) from None
        filled.add((target, shard))
    missing = [f"{pname}{'' if s is None else f'[{s}]'}" for pname, p in params.items()
               for s in getattr(p, "shard_ids", (None,)) if (pname, s) not in filled]
    if missing or unexpected:
        raise WeightMismatchError(missing, unexpected, [])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build parameters directly in `dtype` (no float32 copy of a large model first).

    torch's default dtype is process-wide: load models before other threads create tensors
    (the engine loads before it serves).
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_dir: str | Path, cfg: ModelConfig | None = None,
               dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               progress: bool = True, quantization: str | None = None
               ) -> Glm4vForConditionalGeneration:
    """The model of `model_dir` with its weights, in eval mode, ready for inference.

    `quantization="int8"`: the linear layers of the decoder and the vision tower are then
    quantized to int8 (W8A8, layers/quantization.py)."""
    cfg = cfg or ModelConfig.from_pretrained(model_dir)
    torch_dtype = resolve_dtype(dtype, cfg)
    check_quantization(quantization, torch_dtype, torch.device(device))
    reader = CheckpointReader(model_dir)
    validate_checkpoint(reader, cfg)
    with _default_dtype(torch_dtype), torch.device(device):
        model = model_class(cfg)(cfg)
    try:
        load_weights(model, iter_weights(reader, cfg.quantization, progress))
    finally:
        reader.close()
    if quantization is not None:
        quantize_linear_layers(model.model.language_model)
        quantize_linear_layers(model.model.visual)
        if not cfg.tie_word_embeddings:  # a tied head is the embedding table: kept whole
            quantize_linear_layers(model.lm_head)
    return model.eval().requires_grad_(False)
