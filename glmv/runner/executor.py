"""The model and its KV cache on one rank, and how rank 0 drives the other ranks' copies.

Under tensor parallelism every rank holds a slice of the model and of the KV cache (its KV
heads), and every forward is a sequence of collectives all ranks must join in the same order.
Rank 0 owns everything else (scheduler, block manager, encoder cache, sampling); before each
model call it broadcasts the call to the other ranks, which make the same call on their slice:

    rank 0 (ModelRunner)                         rank r > 0 (serve_steps)
    channel.send(("encode", pixels, grids))  ->  executor.encode(pixels, grids)
    channel.send(("forward", chunks, rows))  ->  executor.forward(chunks, rows)
    channel.send(("stop",))                  ->  return

Calls travel as pickled objects over the group's own backend (torch.distributed broadcast), so
the same code runs on one machine or many; a message is a step's token ids, positions and
block tables (and a prefill's vision rows), small beside the step itself. Logits come out of
every rank (the LM head gathers them); only rank 0 samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from glmv.distributed.parallel_state import TPGroup
from glmv.kernels import get_ops
from glmv.layers.linear import pack_linear_weights
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.runner.input_batch import SeqChunk, build_step_inputs
from glmv.runner.kv_cache import KVCacheSpec, allocate_kv_cache


class ModelExecutor:
    """The model (this rank's slice) with its paged KV cache bound into every attention layer."""

    def __init__(self, model: Glm4vForConditionalGeneration, cache: KVCacheSpec,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        if torch.device(device).type == "cpu" and _dtype(model) is torch.bfloat16:
            get_ops()  # compile the fused kernels now (once per machine), not in a request
        # CPU bf16: packed weights (much faster decode-sized products).
        self.num_packed_layers = pack_linear_weights(model)
        self.cache_spec = cache
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_cache(cache, self.device)
        self._layers = model.kv_cache_layers()
        if len(self._layers) != len(self.kv_caches):
            raise ValueError(f"{len(self._layers)} attention layers but {len(self.kv_caches)} "
                             "caches")
        self._bind()

    def _bind(self) -> None:
        """Point every attention layer at this executor's cache (another one built on the
        same model, e.g. in tests, may have rebound them)."""
        for layer, kv in zip(self._layers, self.kv_caches, strict=True):
            if layer.kv_cache is not kv:
                layer.kv_cache = kv

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[P, patch_dim] -> [P / merge^2, hidden] in the model's dtype."""
        return self.model.encode_vision(pixels.to(self.device), grids)

    @property
    def greedy_without_logits(self) -> bool:
        """Whether forward(..., greedy=True) picks tokens straight from the LM head's product
        (no [rows, vocab] logits written and read back)."""
        return bool(self.model.lm_head.chooses_greedy)

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], logit_chunks: Sequence[int],
                greedy: bool = False) -> torch.Tensor:
        """One forward over all chunks; logits [len(logit_chunks), vocab] of those chunks' last
        tokens, in the model's dtype; with `greedy`, each of those rows' argmax token instead
        (int64 [len(logit_chunks)]: Glm4vForConditionalGeneration.greedy_tokens)."""
        self._bind()
        step = build_step_inputs(chunks, self.cache_spec.block_size, self.device)
        embeds = self.model.embed_with_vision(step.input_ids, step.vision_embeds,
                                              step.vision_mask)
        # each chunk is one sequence of the step: only its last token's hidden state is read
        rows = self.model(embeds, step.positions, step.meta, last_of=list(logit_chunks))
        return self.model.greedy_tokens(rows) if greedy else self.model.compute_logits(rows)


class StepChannel:
    """Rank 0's model calls, broadcast to the other ranks of the tensor-parallel group."""

    def __init__(self, tp: TPGroup) -> None:
        if tp.size < 2:
            raise ValueError("a step channel needs a group of two or more ranks")
        self.tp = tp

    @classmethod
    def for_group(cls, tp: TPGroup) -> StepChannel | None:
        """The channel of a group of several ranks; None on one device."""
        return cls(tp) if tp.size > 1 else None

    def send(self, *message: Any) -> None:
        """Rank 0: hand `message` to every other rank."""
        self._broadcast(list(message))

    def recv(self) -> tuple[Any, ...]:
        """Ranks > 0: the next message from rank 0 (blocks until it comes)."""
        return tuple(self._broadcast(None))

    def _broadcast(self, message: list[Any] | None) -> list[Any]:
        box: list[Any] = [message]
        device = None  # gloo: the CPU; NCCL moves the pickled bytes through this rank's GPU
        if dist.get_backend(self.tp.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        dist.broadcast_object_list(box, src=0, group=self.tp.group, device=device)
        return box[0]


def portable(chunks: list[SeqChunk]) -> list[SeqChunk]:
    """The chunks with their vision rows on the CPU (each rank moves a message onto its own
    device; a CUDA tensor would unpickle onto rank 0's)."""
    out = []
    for chunk in chunks:
        if chunk.vision_embeds is not None and chunk.vision_embeds.device.type != "cpu":
            chunk = SeqChunk(chunk.token_ids, chunk.positions, chunk.start, chunk.block_table,
                             chunk.vision_embeds.cpu(), chunk.vision_mask)
        out.append(chunk)
    return out


def serve_steps(model: Glm4vForConditionalGeneration, channel: StepChannel,
                device: torch.device | str = "cpu") -> None:
    """Ranks > 0: take the KV cache's shape from rank 0, then make every model call rank 0
    makes, until it says stop."""
    kind, spec = channel.recv()
    if kind != "cache":
        raise RuntimeError(f"expected the KV cache shape from rank 0, got {kind!r}")
    executor = ModelExecutor(model, spec, device)
    while True:
        kind, *args = channel.recv()
        if kind == "stop":
            return
        if kind == "encode":
            executor.encode(*args)
        elif kind == "forward":
            executor.forward(*args)
        else:
            raise RuntimeError(f"unknown message from rank 0: {kind!r}")


def _dtype(model: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
