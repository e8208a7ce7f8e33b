"""Tensor-parallel layers: on two gloo processes, each linear layer, the embedding and the LM
head split over the ranks give what the whole layer gives (the sharded outputs are the matching
slices; reduced and gathered outputs are equal), with weights loaded from the full checkpoint
tensors by each rank's own loader."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from glmv.distributed.parallel_state import (
    TPGroup,
    destroy_distributed,
    get_tp_group,
    init_distributed,
)
from glmv.errors import ConfigError
from glmv.layers.embedding import ParallelLMHead, VocabParallelEmbedding, padded_vocab_size
from glmv.layers.linear import (
    ColumnParallelLinear,
    Linear,
    MergedColumnParallelLinear,
    MergedLinear,
    QKVParallelLinear,
    RowParallelLinear,
    ShapeMismatch,
)
from glmv.layers.moe import FusedExperts

HIDDEN, WIDTH, HEAD_DIM = 32, 48, 8


def _random_layer(layer: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))


def _load(layer: torch.nn.Module, name: str, tensor: torch.Tensor, shard: object = None) -> None:
    param = getattr(layer, name)
    loader = getattr(param, "weight_loader", None)
    with torch.no_grad():
        if loader is None:
            param.copy_(tensor)
        else:
            loader(param, tensor, shard)


def _check_all(tp: TPGroup) -> None:
    # float64: the all-reduce adds the partial products in another order than one product
    # does, which in float32 moves the last bits; in float64 the default tolerances hold.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _check_layers(tp)
    finally:
        torch.set_default_dtype(old)


def _check_layers(tp: TPGroup) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, HIDDEN)

    # MLP: gate_up column-parallel, down row-parallel: one all-reduce gives the whole output.
    gate_up, down = MergedLinear(HIDDEN, [(0, WIDTH), (1, WIDTH)]), Linear(WIDTH, HIDDEN, True)
    _random_layer(gate_up, 1)
    _random_layer(down, 2)
    tp_gate_up = MergedColumnParallelLinear(HIDDEN, [(0, WIDTH), (1, WIDTH)], tp=tp)
    tp_down = RowParallelLinear(WIDTH, HIDDEN, bias=True, tp=tp)
    for shard in (0, 1):
        offset = shard * WIDTH
        _load(tp_gate_up, "weight", gate_up.weight[offset:offset + WIDTH], shard)
    _load(tp_down, "weight", down.weight)
    _load(tp_down, "bias", down.bias)

    def mlp(up: torch.nn.Module, dn: torch.nn.Module) -> torch.Tensor:
        g, u = up(x).chunk(2, dim=-1)
        return dn(F.silu(g) * u)

    torch.testing.assert_close(mlp(tp_gate_up, tp_down), mlp(gate_up, down))

    # Column-parallel: the rank's slice, or the whole output when gathered.
    full = Linear(HIDDEN, WIDTH, bias=True)
    _random_layer(full, 3)
    for gather in (False, True):
        column = ColumnParallelLinear(HIDDEN, WIDTH, bias=True, gather_output=gather, tp=tp)
        _load(column, "weight", full.weight)
        _load(column, "bias", full.bias)
        want = full(x) if gather else full(x).chunk(tp.size, dim=-1)[tp.rank]
        torch.testing.assert_close(column(x), want)

    # Row-parallel fed the full input: each rank takes its slice of it.
    row = RowParallelLinear(WIDTH, HIDDEN, bias=True, input_is_parallel=False, tp=tp)
    _load(row, "weight", down.weight)
    _load(row, "bias", down.bias)
    h = torch.randn(5, WIDTH)
    torch.testing.assert_close(row(h), down(h))

    # QKV: heads split; with fewer KV heads than ranks each KV head is replicated.
    for num_heads, num_kv in ((4, 2), (4, 1), (2, 2)):
        q_size, kv_size = num_heads * HEAD_DIM, num_kv * HEAD_DIM
        qkv = MergedLinear(HIDDEN, [("q", q_size), ("k", kv_size), ("v", kv_size)], bias=True)
        _random_layer(qkv, 4)
        part = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads, num_kv, bias=True, tp=tp)
        for name in ("weight", "bias"):
            pieces = getattr(qkv, name).split([q_size, kv_size, kv_size], dim=0)
            for shard, piece in zip("qkv", pieces, strict=True):
                _load(part, name, piece, shard)
        q, k, v = qkv.split(qkv(x))
        q_part, k_part, v_part = part.split(part(x))
        heads = num_heads // tp.size
        torch.testing.assert_close(q_part, q[:, tp.rank * heads * HEAD_DIM:][:, :heads * HEAD_DIM])
        kv_heads = part.num_kv_heads
        kv_at = part.kv_index * kv_heads * HEAD_DIM
        for got, whole in ((k_part, k), (v_part, v)):
            torch.testing.assert_close(got, whole[:, kv_at:kv_at + kv_heads * HEAD_DIM])
        if num_kv < tp.size:
            # Replicated: rank r holds KV head r * num_kv // tp.
            assert part.kv_index == tp.rank * num_kv // tp.size

    # Embedding and LM head over a vocabulary that does not split evenly (padded).
    vocab = 100
    table = torch.randn(vocab, HIDDEN)
    embed, head = VocabParallelEmbedding(vocab, HIDDEN, tp=tp), ParallelLMHead(HIDDEN, vocab, tp=tp)
    assert embed.weight.shape[0] * tp.size == padded_vocab_size(vocab, tp.size) >= vocab
    assert head.weight.shape == embed.weight.shape  # a tied head can share the slice
    _load(embed, "weight", table)
    _load(head, "weight", table)
    ids = torch.tensor([[0, 1, 63, 64, 99], [98, 50, 2, 64, 0]])
    torch.testing.assert_close(embed(ids), F.embedding(ids, table))
    torch.testing.assert_close(head(x), x @ table.T)

    _check_experts(tp)


EXPERTS, TOP_K = 4, 2


def _routing(num_tokens: int, experts: range, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TOP_K distinct experts out of `experts` per token, and positive weights."""
    generator = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(len(experts), generator=generator)[:TOP_K]
             for _ in range(num_tokens)]
    ids = torch.stack(picks) + experts.start
    return torch.rand(num_tokens, TOP_K, generator=generator), ids


def _check_experts(tp: TPGroup) -> None:
    """Routed experts, width split or (expert parallel) placed whole on the ranks, equal the
    whole layer: for several tokens, for one (fewer tokens than ranks: a rank has none to
    send), and for routing that sends every token to one rank's experts (the others receive
    nothing)."""
    whole = FusedExperts(EXPERTS, HIDDEN, WIDTH, tp=TPGroup())
    _random_layer(whole, 5)
    half = EXPERTS // 2
    routings = [(5, range(EXPERTS)), (1, range(EXPERTS)), (4, range(half)),
                (3, range(half, EXPERTS))]
    for expert_parallel in (False, True):
        split = FusedExperts(EXPERTS, HIDDEN, WIDTH,
                             tp=replace(tp, expert_parallel=expert_parallel))
        for e in range(EXPERTS):
            gate, up = whole.w13[e].chunk(2)
            _load(split, "w13", gate, (e, "gate"))
            _load(split, "w13", up, (e, "up"))
            _load(split, "w2", whole.w2[e], (e, "down"))
        for seed, (num_tokens, experts) in enumerate(routings):
            h = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
            weights, ids = _routing(num_tokens, experts, seed)
            torch.testing.assert_close(split(h, weights, ids), whole(h, weights, ids))


def _worker(rank: int, world_size: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    tp = init_distributed(world_size, rank, init_method=rendezvous, backend="gloo")
    try:
        assert (tp.rank, tp.size, tp.group) == (rank, world_size, None)
        assert get_tp_group() is tp
        _check_all(tp)
    finally:
        destroy_distributed()


def test_layers_split_over_two_gloo_ranks_equal_the_whole() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, f"tcp://127.0.0.1:{port}"), nprocs=2, join=True)


def test_a_world_of_one_needs_no_process_group() -> None:
    tp = init_distributed(1, 0)
    assert (tp.rank, tp.size, tp.group) == (0, 1, None)
    _check_all(tp)


@pytest.mark.parametrize("build, message", [
    (lambda tp: QKVParallelLinear(HIDDEN, HEAD_DIM, 3, 1, tp=tp), "attention heads \\(3\\)"),
    (lambda tp: QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 3, tp=tp), "KV heads \\(3\\)"),
    (lambda tp: ColumnParallelLinear(HIDDEN, 7, tp=tp), "output features \\(7\\)"),
    (lambda tp: RowParallelLinear(7, HIDDEN, tp=tp), "input features \\(7\\)"),
    (lambda tp: MergedColumnParallelLinear(HIDDEN, [(0, 5), (1, 5)], tp=tp), "projection 0"),
    (lambda tp: FusedExperts(8, HIDDEN, 7, tp=tp), "intermediate size \\(7\\)"),
    (lambda tp: FusedExperts(3, HIDDEN, 8, tp=replace(tp, expert_parallel=True)),
     "routed experts \\(3\\)"),
])
def test_uneven_splits_are_refused_naming_what(build: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(TPGroup(rank=0, size=2))  # type: ignore[operator]


def test_replicating_kv_heads_needs_a_multiple() -> None:
    with pytest.raises(ConfigError, match="not a multiple of the KV heads \\(2\\)"):
        QKVParallelLinear(HIDDEN, HEAD_DIM, 6, 2, tp=TPGroup(rank=0, size=3))


def test_bad_ranks_are_refused() -> None:
    with pytest.raises(ConfigError, match="rank 2 does not fit a world of size 2"):
        init_distributed(2, 2)


@pytest.mark.parametrize("size", [1, 2])
def test_a_checkpoint_tensor_of_the_wrong_size_is_refused_not_sliced(size: int) -> None:
    tp = TPGroup(rank=size - 1, size=size)  # loading needs no communication
    column = ColumnParallelLinear(HIDDEN, WIDTH, tp=tp)
    merged = MergedColumnParallelLinear(HIDDEN, [(0, WIDTH), (1, WIDTH)], tp=tp)
    qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 2, tp=tp)
    row = RowParallelLinear(WIDTH, HIDDEN, tp=tp)
    experts = FusedExperts(4, HIDDEN, WIDTH, tp=tp)
    cases = [
        (column, "weight", (WIDTH + 2, HIDDEN), None),
        (merged, "weight", (WIDTH * 2, HIDDEN), 0),
        (qkv, "weight", (4 * HEAD_DIM + 8, HIDDEN), "q"),
        (qkv, "weight", (2 * HEAD_DIM - 8, HIDDEN), "k"),
        (row, "weight", (HIDDEN, WIDTH + 2), None),
        (experts, "w13", (WIDTH * 2, HIDDEN), (size - 1, "gate")),
        (experts, "w2", (HIDDEN, WIDTH - 2), (size - 1, "down")),
    ]
    for layer, name, shape, shard in cases:
        with pytest.raises(ShapeMismatch, match=f"shape \\[{shape[0]}, {shape[1]}\\]"):
            _load(layer, name, torch.zeros(shape), shard)
