"""Engine settings: the KV cache and the scheduler (frozen, validated once; vLLM's flag names).

Level 0 of the dependency order (with glmv.config): nothing here imports torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

from glmv.errors import ConfigError

GiB = 1024**3


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache and the vision-encoder cache."""

    block_size: int = 16  # tokens per KV block
    kv_cache_memory_gib: float | None = None  # KV cache size; None = the device's default
    gpu_memory_utilization: float = 0.9  # CUDA, kv_cache_memory_gib None: fraction of free memory
    enable_prefix_caching: bool = True  # reuse KV blocks of identical prefixes (media-aware)
    encoder_cache_gib: float = 0.5  # vision-encoder outputs kept by content hash (0 = off)

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ConfigError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        if not self.encoder_cache_gib >= 0:
            raise ConfigError(f"encoder_cache_gib must be >= 0, got {self.encoder_cache_gib}")

    @property
    def encoder_cache_bytes(self) -> int:
        return int(self.encoder_cache_gib * GiB)


#: CPU default when no KV size is given: enough for a few long multimodal requests.
DEFAULT_CPU_KV_CACHE_GIB = 4.0


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one engine step may take on.

    One token budget per step (`max_num_batched_tokens`) shared by decode tokens and prefill
    chunks; a prompt longer than what is left of the budget is prefilled in chunks.
    """

    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens computed per step, all requests together
    max_model_len: int = 32768  # prompt + output tokens of one request
    enable_chunked_prefill: bool = True  # False: a prompt is scheduled whole or waits
    policy: Literal["fcfs", "priority"] = "fcfs"  # priority: lower value runs first
    # A step that finishes some prompt (a first token) starts no prompt it cannot finish: that
    # chunk would only delay the first token, since the next step can take the whole prompt.
    hold_partial_prefills: bool = True

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_model_len", self.max_model_len)
        if self.policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling policy must be 'fcfs' or 'priority', got "
                              f"{self.policy!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len}), or a long prompt never runs")


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to build an engine; `glmv serve`/`generate` flags and `LLM(...)`
    keywords map 1:1 onto these fields. None means: derive it from the model and the device."""

    model: str = "demo"  # folder, hub id, or "demo[:variant]" (random-weight demo checkpoint)
    dtype: str = "auto"  # "auto" = the checkpoint's dtype
    device: str = "cpu"
    max_model_len: int | None = None  # default: the model's limit, capped by the KV cache
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # default: see default_batched_tokens
    block_size: int = 16
    kv_cache_memory: float | None = None  # GiB; default 4 on CPU, a share of free memory on GPU
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    encoder_cache_gib: float = 0.5
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    show_progress: bool = True  # progress bar while loading weights
    quantization: Literal["int8"] | None = None  # int8: W8A8 decoder products (CPU)
    # Several devices (see docs/deployment.md): ranks in all, split like Megatron/vLLM.
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts per rank, tokens sent by all-to-all
    mm_encoder_tp_mode: Literal["weights", "data"] = "weights"  # vision tower split or replicated
    nnodes: int = 1  # machines the ranks are spread over (tensor_parallel_size / nnodes each)
    node_rank: int = 0  # this machine's index; 0 serves HTTP
    master_addr: str = "127.0.0.1"  # where rank 0 listens for the others to join
    master_port: int | None = None  # default: a free port (one machine), 29500 (several)

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("nnodes", self.nnodes)
        if self.tensor_parallel_size % self.nnodes:
            raise ConfigError(f"tensor_parallel_size ({self.tensor_parallel_size}) must be a "
                              f"multiple of nnodes ({self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.mm_encoder_tp_mode not in ("weights", "data"):
            raise ConfigError("mm_encoder_tp_mode must be 'weights' or 'data', got "
                              f"{self.mm_encoder_tp_mode!r}")

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                           self.enable_prefix_caching, self.encoder_cache_gib)

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = default_batched_tokens(self.device)
            if not self.enable_chunked_prefill:
                budget = max(budget, max_model_len)
        # A CPU step's time grows with its tokens, so a partial prompt only delays the first
        # tokens finishing beside it; a GPU step of fewer tokens is hardly shorter, so there
        # filling it is nearly free throughput.
        on_cpu = self.device.split(":", 1)[0] == "cpu"
        return SchedulerConfig(self.max_num_seqs, budget, max_model_len,
                               self.enable_chunked_prefill, self.scheduling_policy,
                               hold_partial_prefills=on_cpu)


#: Tokens per step when `max_num_batched_tokens` is not given. A step runs every running
#: request's next token and the next prefill chunks together, so its length is the stall each
#: stream sees while a prompt is read. On a GPU a 2048-token step takes tens of milliseconds;
#: on a CPU one takes seconds (1.2 s on two cores for a 0.6 B model), so there steps are
#: kept to 512 tokens: with 16 image requests arriving at once the median time to first
#: token fell from 4.5 to 2.9 s and throughput stayed within 2% (docs/benchmarks.md).
DEFAULT_BATCHED_TOKENS = {"cpu": 512}
DEFAULT_BATCHED_TOKENS_ACCELERATOR = 2048


def default_batched_tokens(device: str) -> int:
    kind = device.split(":", 1)[0]
    return DEFAULT_BATCHED_TOKENS.get(kind, DEFAULT_BATCHED_TOKENS_ACCELERATOR)


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """Several devices or machines (docs/deployment.md); vLLM's and SGLang's flag names."""
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many ranks (processes), one per device")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: place whole experts on ranks, tokens sent by all-to-all")
    g.add_argument("--mm-encoder-tp-mode", choices=("weights", "data"), default="weights",
                   help="vision tower: split like the decoder (weights) or whole on every "
                        "rank, each encoding a share of the images (data)")
    g.add_argument("--nnodes", type=int, default=1,
                   help="machines the ranks are spread over (run the command on each)")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index (0 serves)")
    g.add_argument("--master-addr", default="127.0.0.1",
                   help="address of node 0, where the ranks meet")
    g.add_argument("--master-port", type=int, default=None,
                   help="port on node 0 where the ranks meet (default: free port, 29500 for "
                        "several nodes)")


def parallel_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineArgs fields of the parallelism flags."""
    return dict(tensor_parallel_size=args.tensor_parallel_size,
                enable_expert_parallel=args.enable_expert_parallel,
                mm_encoder_tp_mode=args.mm_encoder_tp_mode, nnodes=args.nnodes,
                node_rank=args.node_rank, master_addr=args.master_addr,
                master_port=args.master_port)
