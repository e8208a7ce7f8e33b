"""Starting the ranks of a tensor-parallel group and keeping watch over them.

Three ways to launch N ranks (docs/deployment.md):
- one machine: `glmv serve --tensor-parallel-size N` (or `LLM(tensor_parallel_size=N)`) is
  rank 0 and spawns ranks 1..N-1 itself;
- several machines, glmv's launcher: the same command on every node with `--nnodes M
  --node-rank k --master-addr <node 0>`; each node's process is its first rank and spawns the
  node's others (ranks k*N/M ..);
- torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): every rank is
  its own process, nothing is spawned.
Rank 0 loads its slice and runs the engine (and the HTTP server); every other rank runs
`run_worker`: it joins the group, takes the checkpoint path from rank 0, loads its slice and
repeats rank 0's model calls until rank 0 stops (executor.py).

A spawned worker that dies is noticed by a watcher thread at once; a rank glmv did not spawn
(torchrun, another node) shows up as a failed collective in the next step. Either way the
engine ends with EngineDeadError naming the cause instead of hanging.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from glmv.config import ModelConfig
from glmv.distributed.parallel_state import (
    TPGroup,
    assumed_group,
    destroy_distributed,
    get_tp_group,
    init_distributed,
)
from glmv.engine.config import EngineArgs
from glmv.errors import ConfigError
from glmv.models.loader import load_model
from glmv.models.registry import model_class
from glmv.runner.executor import StepChannel, serve_steps

logger = logging.getLogger(__name__)

#: How long a collective may wait. Idle workers wait for rank 0's next call inside one, for as
#: long as the server sits idle, so the default (30 min for gloo, 10 for NCCL) would end them.
#: A dead peer is noticed from its closed connection (or the watcher), not from this timeout.
COLLECTIVE_TIMEOUT = timedelta(days=3650)
#: Seconds rank 0 waits for its spawned workers to leave after telling them to stop.
_JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Placement:
    """Where this process sits in the group."""

    world_size: int
    rank: int
    local_rank: int  # index on this machine (its CUDA device)
    init_method: str  # how the ranks find each other ("env://", "tcp://host:port")
    spawned_ranks: tuple[int, ...] = ()  # ranks this process starts itself (its node's others)


def _torchrun_world() -> int | None:
    """WORLD_SIZE when a torchrun-style launcher started this process, else None."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["WORLD_SIZE"])
    return None


def placement(args: EngineArgs) -> Placement:
    """This process's rank, from torchrun's environment or from the engine's flags."""
    world = _torchrun_world()
    if world is not None and world > 1:
        if args.tensor_parallel_size not in (1, world):
            raise ConfigError(f"--tensor-parallel-size {args.tensor_parallel_size} but the "
                              f"launcher started {world} ranks (WORLD_SIZE)")
        rank = int(os.environ["RANK"])
        return Placement(world, rank, int(os.environ.get("LOCAL_RANK", rank)), "env://")
    world = args.tensor_parallel_size
    if world == 1:
        return Placement(1, 0, 0, "")
    per_node = world // args.nnodes
    first = args.node_rank * per_node
    port = args.master_port or (29500 if args.nnodes > 1 else _free_port())
    host = f"[{args.master_addr}]" if ":" in args.master_addr else args.master_addr
    return Placement(world, first, 0, f"tcp://{host}:{port}",
                     tuple(range(first + 1, first + per_node)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_split(config: ModelConfig, args: EngineArgs) -> None:
    """Build the model's skeleton on the meta device (no memory, no weights) as rank 0 of the
    group it would run on: a size that does not divide over the ranks (heads, KV heads,
    experts, widths) raises its ConfigError here, before any process starts."""
    if args.tensor_parallel_size == 1 and _torchrun_world() in (None, 1):
        return
    world = placement(args).world_size
    group = TPGroup(rank=0, size=world, expert_parallel=args.enable_expert_parallel,
                    encoder_data_parallel=args.mm_encoder_tp_mode == "data")
    with assumed_group(group), torch.device("meta"):
        model_class(config)(config)


def rank_device(device: str, local_rank: int) -> str:
    """A CUDA rank uses the device of its local index; CPU ranks all use the CPU."""
    if torch.device(device).type != "cuda":
        return device
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def _join(args: EngineArgs, place: Placement) -> None:
    init_distributed(place.world_size, place.rank, init_method=place.init_method,
                     enable_expert_parallel=args.enable_expert_parallel,
                     mm_encoder_tp_mode=args.mm_encoder_tp_mode, timeout=COLLECTIVE_TIMEOUT)


class WorkerGroup:
    """Rank 0's handle on the other ranks: the processes it spawned (watched) and the channel
    that starts their step loops."""

    def __init__(self, place: Placement, processes: list[multiprocessing.process.BaseProcess]
                 ) -> None:
        self.place = place
        self.processes = processes
        self.channel = StepChannel(get_tp_group())
        self._closing = threading.Event()
        self._on_death: list[Callable[[str], None]] = []
        self.death: str | None = None  # why the group broke, once it has
        self.threads_before: int | None = None  # rank 0's torch width before the ranks shared
        self._watcher = threading.Thread(target=self._watch, name="glmv-worker-watch",
                                         daemon=True)
        self._watcher.start()

    @classmethod
    def start(cls, args: EngineArgs, model_path: Path) -> WorkerGroup | None:
        """Spawn this node's other ranks, join the group as rank 0 and hand every rank the
        checkpoint to load. None on one device."""
        place = placement(args)
        if place.world_size == 1:
            return None
        if place.rank != 0:
            raise ConfigError(f"this process is rank {place.rank} of {place.world_size}: only "
                              "rank 0 runs the engine; start the others with `glmv serve` or "
                              "`glmv generate` under the same launcher")
        threads_before = torch.get_num_threads()
        processes = spawn_workers(args, place)
        try:
            _join(args, place)
            group = cls(place, processes)
            group.threads_before = threads_before
            group.channel.send("model", str(model_path))
        except BaseException:
            _terminate(processes)
            torch.set_num_threads(threads_before)
            raise
        return group

    def wait_for_death(self, timeout: float) -> str | None:
        """Why the group broke, waiting up to `timeout` s for the watcher to notice a spawned
        worker's exit (a failed collective on rank 0 usually comes first); None if none did."""
        self._watcher.join(timeout)
        return self.death

    def on_death(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (from the watcher thread) when a spawned worker dies."""
        self._on_death.append(callback)

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        if not sentinels:
            return
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._closing.is_set():
            return
        proc = sentinels[ready[0]]  # type: ignore[index]
        proc.join(1.0)
        self.death = (f"tensor-parallel worker {proc.name} (pid {proc.pid}) exited with status "
                      f"{proc.exitcode} (its log says why); the model is split over all ranks, "
                      "so the engine cannot go on without it")
        logger.critical(self.death)
        for callback in self._on_death:
            callback(self.death)

    def close(self) -> None:
        """Stop the workers' step loops, leave the group and reap the spawned processes."""
        if self._closing.is_set():
            return
        self._closing.set()
        healthy = self.death is None
        if healthy:
            try:
                self.channel.send("stop")
            except Exception:  # a peer is gone: nothing to tell it
                healthy = False
        destroy_distributed(barrier=healthy)
        for proc in self.processes:
            proc.join(_JOIN_TIMEOUT_S if healthy else 1.0)
        _terminate(self.processes)
        if self.threads_before is not None:  # the cores are this process's alone again
            torch.set_num_threads(self.threads_before)


def spawn_workers(args: EngineArgs, place: Placement
                  ) -> list[multiprocessing.process.BaseProcess]:
    """Start this node's other ranks (fresh interpreters: torch and fork do not mix)."""
    context = multiprocessing.get_context("spawn")
    threads = _threads_per_rank(args, len(place.spawned_ranks) + 1)
    if threads:
        torch.set_num_threads(threads)
    processes: list[multiprocessing.process.BaseProcess] = []
    for local, rank in enumerate(place.spawned_ranks, start=1):
        proc = context.Process(target=_worker_main, name=f"rank {rank}",
                               args=(args, Placement(place.world_size, rank, local,
                                                     place.init_method), threads),
                               daemon=True)
        proc.start()
        processes.append(proc)
    return processes


def _threads_per_rank(args: EngineArgs, local_ranks: int) -> int | None:
    """CPU ranks on one machine share its cores: each gets its share, unless the user set
    OMP_NUM_THREADS."""
    if torch.device(args.device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // local_ranks)


def _terminate(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)


def _worker_main(args: EngineArgs, place: Placement, threads: int | None) -> None:
    """A spawned rank: run until rank 0 says stop; exit status 1 (and the reason) on failure."""
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank {place.rank} "
                        "%(name)s: %(message)s")
    try:
        run_worker(args, place)
    except Exception as exc:
        logger.exception("rank %d failed", place.rank)
        print(f"glmv: rank {place.rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


def run_worker(args: EngineArgs, place: Placement | None = None) -> None:
    """Be one rank > 0: join the group, load this rank's slice of the checkpoint rank 0 names,
    and repeat rank 0's model calls until it stops. With glmv's multi-node launcher the
    process also spawns its node's other ranks."""
    place = place or placement(args)
    processes = spawn_workers(args, place) if place.spawned_ranks else []
    try:
        device = rank_device(args.device, place.local_rank)
        _join(args, place)
        channel = StepChannel(get_tp_group())
        kind, path = channel.recv()
        if kind != "model":
            raise RuntimeError(f"expected the checkpoint path from rank 0, got {kind!r}")
        config = ModelConfig.from_pretrained(path)
        model = load_model(path, config, dtype=args.dtype, device=device, progress=False,
                           quantization=args.quantization)
        serve_steps(model, channel, device)
        destroy_distributed()
    finally:
        for proc in processes:
            proc.join(_JOIN_TIMEOUT_S)
        _terminate(processes)


def is_worker_process(args: EngineArgs) -> bool:
    """Whether this process is a rank other than 0 (it runs `run_worker`, not the engine)."""
    return placement(args).rank != 0
