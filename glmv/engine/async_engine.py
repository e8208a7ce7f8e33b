"""The asynchronous engine: an LLMEngine stepped by one background thread, many asyncio callers.

    caller (event loop)                      engine thread
    -------------------                      -------------
    add(request) --- command queue --------> add_request / abort_request
    async for out in stream  <-- per-request asyncio.Queue <-- step() outputs
    (disconnect / cancel) ---- abort ------> abort_request (blocks freed at once)
    abort_all(error) (drain deadline) -----> every request ends with `error`; no new ones

The model forward is blocking PyTorch work, so it runs off the event loop; the loop only moves
Python objects. `glmv serve` steps the engine on its main thread (`host()`, `run()`) and runs
the HTTP server on another: with libgomp, the OpenMP team of the process's initial thread is
the fast one. A model loaded on the main thread and stepped on another ran each product ~1.5x
slower (one-row bf16 product 333-555 us instead of 203-287), and when the cores are shared
with other busy threads or processes, a team led by a non-initial thread ran up to 10x slower.
`start()` steps it on a background thread instead (tests, embedding in another app).
Media fetching and preprocessing run in a bounded thread pool of their own
(`mm_max_concurrent_calls`) with a per-request timeout, so a slow download never stalls a step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from glmv.engine.config import EngineArgs
from glmv.engine.llm_engine import LLMEngine
from glmv.engine.outputs import RequestOutput
from glmv.errors import (
    EngineDeadError,
    EngineError,
    GlmvError,
    MediaError,
    QueueFullError,
    ShuttingDownError,
)
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import ProcessedPrompt
from glmv.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AsyncEngineConfig:
    """Limits of the asynchronous front of the engine."""

    max_queue_len: int = 1024  # requests waiting for a slot; more are refused (503)
    mm_max_concurrent_calls: int = 8  # media fetch/decode/preprocess calls in flight
    mm_per_request_timeout: float = 30.0  # seconds one request's media work may take

    def __post_init__(self) -> None:
        if self.max_queue_len < 1:
            raise GlmvError(f"max_queue_len must be >= 1, got {self.max_queue_len}")
        if self.mm_max_concurrent_calls < 1:
            raise GlmvError("mm_max_concurrent_calls must be >= 1, got "
                            f"{self.mm_max_concurrent_calls}")
        if not self.mm_per_request_timeout > 0:
            raise GlmvError("mm_per_request_timeout must be > 0 seconds, got "
                            f"{self.mm_per_request_timeout}")


@dataclass
class EngineStats:
    """A snapshot the engine thread publishes after every step (read by /metrics)."""

    num_running: int = 0  # requests holding KV blocks
    num_waiting: int = 0  # requests queued for a slot
    num_kv_blocks: int = 0  # blocks in the KV cache
    num_kv_blocks_used: int = 0  # blocks referenced by running requests
    encoder_cache_hits: int = 0  # images/videos served from the vision-encoder cache
    encoder_cache_misses: int = 0
    num_steps: int = 0
    step_failures: int = 0  # steps that raised outside the runner's own guard


@dataclass
class _Stream:
    """Where the engine thread puts one request's outputs for its asyncio consumer."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand an item to the consumer; False when its event loop is gone (nobody listens)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop was closed: its consumer cannot read any more
            return False
        return True


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    """On the consumers' event loop: one step's outputs into their streams."""
    for stream, output in items:
        stream.queue.put_nowait(output)


@dataclass
class _Add:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int
    final_only: bool
    stream: _Stream
    done: concurrent.futures.Future[None]


@dataclass
class _AbortAll:
    error: GlmvError


@dataclass
class _Dead:
    reason: str  # a rank of the tensor-parallel group died while the engine was idle


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it; safe to call from one event loop.

    Invariants: only the engine thread touches the LLMEngine after `start()`; every request
    added gets exactly one finished output or one exception on its stream, and every `add()`
    returns or raises (also when the engine thread stops or dies); a request whose consumer goes
    away is aborted.
    """

    def __init__(self, engine: LLMEngine, config: AsyncEngineConfig | None = None) -> None:
        self.engine = engine
        self.config = config or AsyncEngineConfig()
        self.processor = engine.processor
        self.tokenizer = engine.tokenizer
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue[_Add | _AbortAll | _Dead | str | None] = (
            queue.SimpleQueue())
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None  # start()'s stepping thread
        self._hosted = False  # run() steps the engine on a thread the host owns
        self._loop_done = threading.Event()  # set: no step loop is running or expected
        self._loop_done.set()
        self._stopping = threading.Event()
        self._media_pool = concurrent.futures.ThreadPoolExecutor(
            self.config.mm_max_concurrent_calls, thread_name_prefix="glmv-media",
            initializer=single_threaded_torch)
        self._media_slots: asyncio.Semaphore | None = None
        self._num_pending = 0  # added but not yet finished (queue-length limit)
        self._refusal: GlmvError | None = None  # set: add() refuses new requests with it
        self._lock = threading.Lock()  # guards _num_pending, _refusal and putting _Add commands
        self.step_hook: Callable[[], None] | None = None  # tests inject step faults here
        # Called (from the engine thread) when it stops because the engine cannot go on.
        self.on_death: Callable[[EngineDeadError], None] | None = None
        engine.death_callbacks.append(lambda reason: self._commands.put(_Dead(reason)))

    @classmethod
    def from_args(cls, args: EngineArgs, media_policy: MediaPolicy | None = None,
                  config: AsyncEngineConfig | None = None) -> AsyncEngine:
        return cls(LLMEngine.from_args(args, media_policy), config)

    # -- lifecycle ---------------------------------------------------------------------------

    def host(self) -> None:
        """Declare that `run()` will step the engine on a thread the caller owns; `start()`
        then starts nothing, and requests added before `run()` begins wait for it."""
        self._hosted = True
        self._arm()

    def run(self) -> None:
        """Step the engine on the calling thread until `shutdown()` or `stop()` (after
        `host()`); returns when the loop has ended."""
        if not self._hosted:
            raise EngineError("AsyncEngine.run() steps a hosted engine: call host() first")
        self._run_loop()

    def start(self) -> None:
        """Step the engine on a background thread of its own (nothing when hosted)."""
        if self._hosted or self._thread is not None:
            return
        self._arm()
        self._thread = threading.Thread(target=self._run_loop, name="glmv-engine", daemon=True)
        self._thread.start()

    def _arm(self) -> None:
        """A step loop is about to run: accept requests again."""
        self._stopping.clear()
        self._refusal = None
        self._loop_done.clear()

    def stop(self) -> None:
        """Ask the step loop to end (requests still running end with a ShuttingDownError)."""
        self._stopping.set()
        self._commands.put(None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop (requests still running end with a ShuttingDownError), then
        the other ranks, if any."""
        self.stop()
        stopped = self._loop_done.wait(timeout)
        self._thread = None
        self._media_pool.shutdown(wait=False, cancel_futures=True)
        if stopped:  # a loop still inside a step would race the ranks' teardown
            self.engine.shutdown()

    def abort_all(self, error: GlmvError) -> None:
        """End every request with `error` (streams get it, KV blocks are freed) and refuse new
        ones with it from now on: what a shutdown does when its drain deadline passes."""
        with self._lock:
            self._refusal = error
            self._commands.put(_AbortAll(error))

    @property
    def is_alive(self) -> bool:
        return not self._loop_done.is_set()

    @property
    def num_unfinished(self) -> int:
        return self._num_pending

    # -- media -------------------------------------------------------------------------------

    async def run_media(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run media work (fetch, decode, preprocess, template) in the bounded pool, under the
        per-request timeout."""
        if self._media_slots is None:
            self._media_slots = asyncio.Semaphore(self.config.mm_max_concurrent_calls)
        loop = asyncio.get_running_loop()
        timeout = self.config.mm_per_request_timeout
        async def guarded() -> T:
            assert self._media_slots is not None
            async with self._media_slots:
                return await loop.run_in_executor(self._media_pool, lambda: fn(*args, **kwargs))

        try:
            return await asyncio.wait_for(guarded(), timeout)
        except asyncio.TimeoutError:
            raise MediaError(f"preparing this request's media took longer than {timeout:g} s "
                             "(--mm-per-request-timeout)") from None

    # -- requests ----------------------------------------------------------------------------

    async def add(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                  priority: int = 0, final_only: bool = False) -> RequestStream:
        """Queue a request; its outputs come from the returned stream, which must be closed.

        `final_only`: the stream gets one output, the finished one (with the time of the first
        token in `first_token_time`), instead of one per step: a caller that answers with the
        whole completion saves the event loop's wake-up, and the cores it takes from the
        kernels, on every step.

        Raises the engine's typed error when the request cannot be added (prompt too long,
        bad token ids) and QueueFullError when the server holds `max_queue_len` requests.
        """
        stream = _Stream(asyncio.get_running_loop())
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            # Checked and queued under the lock, so that no add slips in behind the engine
            # thread's exit or an abort_all() and waits for an answer that never comes.
            if not self.is_alive:
                raise EngineError("the engine is not running")
            if self._refusal is not None:
                raise _copy(self._refusal)
            if self._num_pending >= self.config.max_queue_len:
                raise QueueFullError(
                    f"the server has {self._num_pending} requests in flight, its limit "
                    "(--max-queue-len); retry later")
            self._num_pending += 1
            self._commands.put(_Add(request_id, prompt, params, priority, final_only, stream,
                                    done))
        handle = RequestStream(self, request_id, stream)
        try:
            await asyncio.wrap_future(done)
        except BaseException:
            handle.close()
            raise
        return handle

    async def generate(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                       priority: int = 0, final_only: bool = False,
                       ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes (only the finished one with
        `final_only`); leaving the loop early (client gone, task cancelled) aborts the
        request."""
        handle = await self.add(request_id, prompt, params, priority, final_only)
        try:
            async for output in handle:
                yield output
        finally:
            handle.close()

    async def complete(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                       priority: int = 0) -> RequestOutput:
        """Add a request and return its finished output, handed over once (`final_only`);
        cancelling the caller (client gone, timeout) aborts the request."""
        final: RequestOutput | None = None
        async for output in self.generate(request_id, prompt, params, priority,
                                          final_only=True):
            final = output
        assert final is not None and final.finished
        return final

    def _release(self, request_id: str, aborted: bool) -> None:
        with self._lock:
            self._num_pending -= 1
        if aborted:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(request_id)

    # -- the engine thread -------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            self._run()
        finally:
            self._loop_done.set()

    def _run(self) -> None:
        error: GlmvError = ShuttingDownError("the server is shutting down")
        dead: EngineDeadError | None = None
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
        except EngineDeadError as exc:
            error = dead = exc
        except BaseException as exc:
            logger.exception("the engine thread failed")
            error = EngineError(f"the engine stopped: {type(exc).__name__}: {exc}")
            raise
        finally:
            self._close(error)
        if dead is not None and self.on_death is not None:
            self.on_death(dead)

    def _close(self, error: GlmvError) -> None:
        """The thread is ending: refuse new adds, answer queued ones, end running requests."""
        with self._lock:
            self._refusal = self._refusal or error
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add) and command.done.set_running_or_notify_cancel():
                command.done.set_exception(_copy(error))
        self._fail_all(error)

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; wait for one when idle. False on shutdown."""
        while True:
            try:
                command = self._commands.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            if isinstance(command, str):
                self._abort(command)
            elif isinstance(command, _Dead):
                raise EngineDeadError(command.reason)
            elif isinstance(command, _AbortAll):
                self._fail_all(command.error)
            else:
                self._add(command)

    def _add(self, command: _Add) -> None:
        if not command.done.set_running_or_notify_cancel():
            # The caller went away (cancelled) before its request got here: nothing to add,
            # and setting a result on a cancelled future would raise in this thread.
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params,
                                    priority=command.priority, arrival_time=time.monotonic(),
                                    final_only=command.final_only)
        except Exception as exc:
            command.done.set_exception(exc)
            return
        self._streams[command.request_id] = command.stream
        command.done.set_result(None)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            self._publish_stats()

    def _step(self) -> None:
        try:
            if self.step_hook is not None:
                self.step_hook()
            outputs = self.engine.step()
        except EngineDeadError:
            raise  # nothing can run any more: the thread ends and fails every request
        except Exception as exc:
            # The runner already fails only its own step's requests; anything escaping the
            # engine leaves its state unknown, so every request in it ends with this error.
            logger.exception("engine step failed")
            self.stats.step_failures += 1
            self._fail_all(EngineError(f"the engine step failed: {type(exc).__name__}: {exc}"))
            return
        # Stats first: a client that reads /metrics right after its last output must see the
        # state after this step (its request no longer running), not the one before it.
        self._publish_stats()
        # One wake-up of each event loop per step for all of its streams (not one per
        # request): the loop's thread shares the cores with the next step's kernels.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            batches.setdefault(stream.loop, []).append((stream, output))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop was closed: its consumers cannot read any more
                for _, output in items:
                    if not output.finished:
                        self._abort(output.request_id)  # publishes the stats again

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
        for request_id in streams:
            try:
                self.engine.abort_request(request_id)
            except Exception:  # a broken engine: its requests have their error already
                logger.exception("aborting request %s failed", request_id)
        try:
            self._publish_stats()
        except Exception:
            logger.exception("reading the engine's stats failed")

    def _publish_stats(self) -> None:
        engine = self.engine
        scheduler, blocks = engine.scheduler, engine.block_manager
        cache = engine.runner.encoder_cache
        self.stats = EngineStats(
            num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
            num_kv_blocks=blocks.num_blocks, num_kv_blocks_used=blocks.num_used_blocks,
            encoder_cache_hits=cache.hits, encoder_cache_misses=cache.misses,
            num_steps=engine.num_steps, step_failures=self.stats.step_failures)


def _copy(error: GlmvError) -> GlmvError:
    """A fresh exception like `error`, so that each request raises its own."""
    try:
        return type(error)(str(error))
    except TypeError:  # a class whose constructor takes more than a message
        return error


class RequestStream:
    """The outputs of one request, as an async iterator; `close()` releases it (and aborts it
    when it has not finished)."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.request_id = request_id
        self._engine = engine
        self._stream = stream
        self._finished = False
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finished
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._release(self.request_id, aborted=not self._finished)


def single_threaded_torch() -> None:
    """Make torch's parallel regions on the calling thread run on that thread alone.

    For the media threads: with OpenMP every thread that opens a parallel region gets a team
    of its own, whose extra threads then spin for the cores the engine's products need. On
    two cores, 16 concurrent image requests got 1-7% and 16 video requests 4-12% more output
    tok/s with the media threads kept to one (three alternating runs each). The OpenMP setting
    is per thread; torch.set_num_threads would change every thread's (it slowed the engine
    by a third). Does nothing when torch has no OpenMP runtime.
    """
    torch.get_num_threads()  # torch sets each thread's OpenMP width once, on first use
    set_num_threads = _openmp_runtime()
    if set_num_threads is not None:
        set_num_threads(1)


@functools.cache
def _openmp_runtime() -> Any | None:
    """`omp_set_num_threads` of the OpenMP runtime torch itself links to: looked up through
    libtorch_cpu, whose dependencies come first in that search (another copy of libgomp that
    some other package loaded would not change torch's threads)."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        names = sorted(n for n in os.listdir(lib_dir) if n.startswith("libtorch_cpu."))
    except OSError:
        return None
    for name in names:
        try:
            return ctypes.CDLL(os.path.join(lib_dir, name)).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None
