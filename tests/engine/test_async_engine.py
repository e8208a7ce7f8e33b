"""AsyncEngine: the engine thread under many asyncio callers — same tokens as the synchronous
engine, aborts on early close, a bounded queue, bounded media work, and a failing step that
fails its requests without stopping the engine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glmv.engine.async_engine import AsyncEngine, AsyncEngineConfig
from glmv.errors import EngineError, GlmvError, MediaError, QueueFullError
from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from glmv.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Any) -> tuple[MultiModalProcessor, Any]:
    ckpt = tiny_checkpoint("glm-4.6v-flash")
    return MultiModalProcessor.from_pretrained(ckpt), load_model(ckpt, dtype="float32",
                                                                 progress=False)


def _async(loaded: Any, **config: Any) -> AsyncEngine:
    return AsyncEngine(make_engine(*loaded, max_model_len=256), AsyncEngineConfig(**config))


@pytest.fixture
def engine(loaded: Any) -> Iterator[AsyncEngine]:
    eng = _async(loaded)
    eng.start()
    yield eng
    eng.shutdown()


def prompts(processor: MultiModalProcessor, n: int) -> list[ProcessedPrompt]:
    return [processor.process_chat([{"role": "user", "content": f"Question {i}: " + "x" * i}])
            for i in range(n)]


def _all_free(engine: AsyncEngine) -> bool:
    blocks = engine.engine.block_manager
    return (blocks.num_free_blocks == blocks.num_blocks and engine.num_unfinished == 0
            and not engine.engine.has_unfinished_requests())


def _wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


async def _collect(engine: AsyncEngine, request_id: str, prompt: ProcessedPrompt,
                   params: SamplingParams) -> tuple[list[int], str]:
    text, final = "", None
    async for output in engine.generate(request_id, prompt, params):
        text += output.outputs[0].delta_text
        final = output
    assert final is not None and final.finished
    return final.outputs[0].token_ids, text


def test_concurrent_requests_equal_the_synchronous_engine(engine: AsyncEngine,
                                                          loaded: Any) -> None:
    params = SamplingParams.greedy(max_tokens=12, ignore_eos=True)
    batch = prompts(loaded[0], 6)
    expected = run_engine(make_engine(*loaded, max_model_len=256), batch, params)

    async def main() -> list[tuple[list[int], str]]:
        return await asyncio.gather(*(_collect(engine, f"a{i}", p, params)
                                      for i, p in enumerate(batch)))

    for (ids, text), want in zip(asyncio.run(main()), expected, strict=True):
        assert ids == want.outputs[0].token_ids
        assert text == want.outputs[0].text
    _wait_until(lambda: _all_free(engine) and engine.stats.num_kv_blocks_used == 0)
    assert engine.stats.num_running == 0 and engine.stats.num_steps >= 12


def test_a_final_only_stream_gets_one_output_with_the_whole_completion(
        engine: AsyncEngine, loaded: Any) -> None:
    params = SamplingParams.greedy(max_tokens=12, ignore_eos=True)
    [prompt] = prompts(loaded[0], 1)
    [want] = run_engine(make_engine(*loaded, max_model_len=256), [prompt], params)

    async def main() -> tuple[list[Any], float]:
        started = time.monotonic()
        return [o async for o in engine.generate("f", prompt, params, final_only=True)], started

    outputs, started = asyncio.run(main())
    [final] = outputs
    assert final.finished
    assert final.outputs[0].token_ids == want.outputs[0].token_ids
    assert final.outputs[0].text == want.outputs[0].text
    assert final.first_token_time is not None
    assert started < final.first_token_time < time.monotonic()
    # complete(): the same finished output, awaited
    done = asyncio.run(engine.complete("g", prompt, params))
    assert done.finished and done.request_id == "g"
    assert done.outputs[0].token_ids == want.outputs[0].token_ids
    _wait_until(lambda: _all_free(engine))


def test_leaving_a_stream_early_aborts_the_request(engine: AsyncEngine, loaded: Any) -> None:
    params = SamplingParams.greedy(max_tokens=200, ignore_eos=True)

    async def main() -> int:
        seen = 0
        async for output in engine.generate("early", prompts(loaded[0], 1)[0], params):
            seen = len(output.outputs[0].token_ids)
            if seen >= 3:
                break
        return seen

    assert asyncio.run(main()) >= 3
    _wait_until(lambda: _all_free(engine))


def test_a_cancelled_consumer_aborts_the_request(engine: AsyncEngine, loaded: Any) -> None:
    params = SamplingParams.greedy(max_tokens=200, ignore_eos=True)
    engine.step_hook = lambda: time.sleep(0.01)  # 200 steps take 2 s: cancelled long before

    async def main() -> None:
        task = asyncio.ensure_future(_collect(engine, "cancel", prompts(loaded[0], 1)[0],
                                              params))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _wait_until(lambda: _all_free(engine))


def test_a_full_queue_refuses_new_requests(loaded: Any) -> None:
    engine = _async(loaded, max_queue_len=2)
    engine.start()
    params = SamplingParams.greedy(max_tokens=30, ignore_eos=True)
    batch = prompts(loaded[0], 3)

    async def main() -> None:
        first = await engine.add("q0", batch[0], params)
        second = await engine.add("q1", batch[1], params)
        with pytest.raises(QueueFullError, match="--max-queue-len"):
            await engine.add("q2", batch[2], params)
        first.close()  # a slot frees as soon as a request is released
        third = await engine.add("q2", batch[2], params)
        async for _ in third:
            pass
        third.close()
        second.close()

    try:
        asyncio.run(main())
        _wait_until(lambda: _all_free(engine))
    finally:
        engine.shutdown()
    assert QueueFullError.http_status == 503


def test_bad_requests_raise_at_add_and_leave_no_trace(engine: AsyncEngine, loaded: Any) -> None:
    prompt = prompts(loaded[0], 1)[0]
    too_long = loaded[0].process_token_ids([100] * 300)  # max_model_len is 256

    async def main() -> None:
        with pytest.raises(GlmvError, match="256"):
            await engine.add("long", too_long, SamplingParams.greedy(max_tokens=10))
        handle = await engine.add("ok", prompt, SamplingParams.greedy(max_tokens=2))
        async for _ in handle:
            pass
        handle.close()

    asyncio.run(main())
    _wait_until(lambda: _all_free(engine))


def test_media_work_is_bounded_and_timed_out(loaded: Any) -> None:
    engine = _async(loaded, mm_max_concurrent_calls=2, mm_per_request_timeout=0.5)
    running, peak, lock = [0], [0], threading.Lock()

    def work(seconds: float) -> float:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return seconds

    async def main() -> None:
        assert await asyncio.gather(*(engine.run_media(work, 0.1) for _ in range(6))) == [0.1] * 6
        with pytest.raises(MediaError, match="--mm-per-request-timeout"):
            await engine.run_media(work, 2.0)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert peak[0] == 2


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine: AsyncEngine,
                                                                   loaded: Any) -> None:
    params = SamplingParams.greedy(max_tokens=50, ignore_eos=True)
    batch = prompts(loaded[0], 3)
    calls = [0]

    def hook() -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected fault")

    engine.step_hook = hook

    async def main() -> list[Any]:
        return await asyncio.gather(*(_collect(engine, f"f{i}", p, params)
                                      for i, p in enumerate(batch)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineError) and "injected fault" in str(r) for r in results)
    assert engine.stats.step_failures == 1 and engine.is_alive
    _wait_until(lambda: _all_free(engine))
    # The next request is served normally.
    engine.step_hook = None
    ids, _ = asyncio.run(_collect(engine, "after", batch[0],
                                  SamplingParams.greedy(max_tokens=4, ignore_eos=True)))
    assert len(ids) == 4


def test_shutdown_ends_running_requests_with_an_error(loaded: Any) -> None:
    engine = _async(loaded)
    engine.start()
    params = SamplingParams.greedy(max_tokens=10_0, ignore_eos=True)

    async def main() -> None:
        handle = await engine.add("s", prompts(loaded[0], 1)[0], params)
        await handle.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineError, match="shutting down"):
            async for _ in handle:
                pass
        handle.close()
        with pytest.raises(EngineError, match="not running"):
            await engine.add("late", prompts(loaded[0], 1)[0], params)

    asyncio.run(main())
    assert not engine.is_alive


def test_a_caller_gone_before_its_add_is_applied_does_not_kill_the_engine(
        engine: AsyncEngine, loaded: Any) -> None:
    # Regression: a client that hung up while its request still sat in the command queue
    # cancelled the add's future; the engine thread then called set_result on it, died of
    # InvalidStateError, and every other request hung (found by tests/reliability/test_load).
    gate = threading.Event()
    engine.step_hook = lambda: gate.wait(10)  # the thread is stuck in a step meanwhile
    params = SamplingParams.greedy(max_tokens=3, ignore_eos=True)
    first, second = prompts(loaded[0], 2)

    async def main() -> tuple[list[int], str]:
        running = asyncio.ensure_future(_collect(engine, "running", first, params))
        await asyncio.sleep(0.2)  # "running" is in the engine, its first step blocked
        gone = asyncio.ensure_future(engine.add("gone", second, params))
        await asyncio.sleep(0.05)  # queued behind the blocked step
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        gate.set()
        return await asyncio.wait_for(running, 10)

    ids, _ = asyncio.run(main())
    engine.step_hook = None
    assert len(ids) == 3 and engine.is_alive
    _wait_until(lambda: _all_free(engine))
    again, _ = asyncio.run(_collect(engine, "after", second, params))
    assert len(again) == 3


def test_abort_all_ends_every_request_and_refuses_new_ones(engine: AsyncEngine,
                                                           loaded: Any) -> None:
    from glmv.errors import ShuttingDownError

    engine.step_hook = lambda: time.sleep(0.01)
    params = SamplingParams.greedy(max_tokens=500, ignore_eos=True)
    batch = prompts(loaded[0], 3)

    async def main() -> list[Any]:
        tasks = [asyncio.ensure_future(_collect(engine, f"d{i}", p, params))
                 for i, p in enumerate(batch)]
        await asyncio.sleep(0.3)
        engine.abort_all(ShuttingDownError("deadline passed"))
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        with pytest.raises(ShuttingDownError, match="deadline passed") as late:
            await engine.add("late", batch[0], params)
        return [*results, late.value]

    results = asyncio.run(main())
    engine.step_hook = None
    assert all(isinstance(r, ShuttingDownError) and r.http_status == 503 for r in results)
    _wait_until(lambda: _all_free(engine))
    assert engine.is_alive


def test_a_hosted_engine_steps_on_the_thread_that_runs_it(loaded: Any) -> None:
    """glmv serve's arrangement: host(), requests from an event loop on another thread (one
    added before run() begins waits for it), steps on the thread in run(), and shutdown() from
    the other thread ends run()."""
    eng = _async(loaded)
    eng.host()
    eng.start()  # the app's lifespan calls it: nothing to start when hosted
    stepped_on: set[int] = set()
    real_step = eng.engine.step

    def step() -> Any:
        stepped_on.add(threading.get_ident())
        return real_step()
    eng.engine.step = step  # type: ignore[method-assign]
    prompt = prompts(loaded[0], 1)[0]
    results: list[tuple[list[int], str]] = []

    def client() -> None:
        results.append(asyncio.run(_collect(eng, "h", prompt,
                                            SamplingParams.greedy(max_tokens=3, ignore_eos=True))))
        eng.shutdown()

    assert eng.is_alive  # accepting requests before run() begins
    other = threading.Thread(target=client)
    other.start()
    time.sleep(0.2)  # the request is queued before the loop starts
    eng.run()  # returns once the client thread's shutdown() stops it
    other.join(10)
    assert len(results) == 1 and len(results[0][0]) == 3
    assert stepped_on == {threading.get_ident()}
    assert not eng.is_alive


def test_run_without_host_is_refused(loaded: Any) -> None:
    eng = _async(loaded)
    with pytest.raises(EngineError, match="host"):
        eng.run()



def test_media_threads_run_torch_on_one_thread(engine: AsyncEngine) -> None:
    """Media work keeps to its own thread: no OpenMP team of its own to spin for the
    engine's cores."""
    import torch

    before = torch.get_num_threads()
    widths = {engine._media_pool.submit(torch.get_num_threads).result(10) for _ in range(4)}
    assert widths == {1}
    assert torch.get_num_threads() == before


_WIDTHS = """
import concurrent.futures, threading, torch
from glmv.engine.async_engine import single_threaded_torch
main = torch.get_num_threads()
with concurrent.futures.ThreadPoolExecutor(2, initializer=single_threaded_torch) as pool:
    media = pool.submit(torch.get_num_threads).result()
other = []
thread = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
thread.start(); thread.join()
print(main, media, other[0], torch.get_num_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every width is 1 anyway")
def test_one_thread_for_media_leaves_every_other_thread_alone() -> None:
    """In a fresh process (other tests change torch's global width): the main thread and a
    plain new thread keep the default width, a media thread gets 1."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", _WIDTHS], capture_output=True, text=True,
                          env=env, timeout=120, check=True, cwd=Path(__file__).parents[2])
    main, media, other, after = map(int, proc.stdout.split())
    assert main > 1 and media == 1 and other == main and after == main
