"""Scheduler with a fake runner (tests/engine/fakes.py): exact chunks per step, stops,
ordering, preemption, aborts and n > 1 siblings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from glmv.engine.config import EngineArgs
from glmv.engine.request import Request, RequestStatus
from glmv.engine.scheduler import Scheduler
from glmv.sampling_params import SamplingParams
from tests.engine.fakes import (
    FakeRunner,
    chunks_of,
    expected_output,
    make_request,
    make_scheduler,
    run_to_end,
    step,
)


def test_scheduler_and_block_manager_do_not_import_torch() -> None:
    code = ("import sys, glmv.engine.scheduler, glmv.engine.block_manager; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# -- the token budget ------------------------------------------------------------------------

@pytest.mark.parametrize(("device", "chunked", "budget"), [
    ("cpu", True, 512), ("cuda", True, 2048), ("cuda:1", True, 2048),
    ("cpu", False, 4096),  # without chunking a step must hold a whole prompt
])
def test_default_budget_follows_the_device(device: str, chunked: bool, budget: int) -> None:
    args = EngineArgs(device=device, enable_chunked_prefill=chunked)
    config = args.scheduler_config(max_model_len=4096)
    assert config.max_num_batched_tokens == budget
    assert config.hold_partial_prefills == (device == "cpu")  # CPU steps: first tokens first
    given = EngineArgs(device=device, max_num_batched_tokens=8192)
    assert given.scheduler_config(max_model_len=4096).max_num_batched_tokens == 8192


def test_budget_is_shared_by_decodes_and_a_chunked_prefill() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=10), FakeRunner()
    sched.add_request(make_request("a", 4, max_tokens=8))
    sched.add_request(make_request("b", 4, max_tokens=8))
    assert chunks_of(step(sched, runner)[0]) == [("a", 0, 4), ("b", 0, 4)]
    sched.add_request(make_request("c", list(range(100, 120)), max_tokens=2))
    expected = [
        [("a", 4, 1), ("b", 4, 1), ("c", 0, 8)],
        [("a", 5, 1), ("b", 5, 1), ("c", 8, 8)],
        [("a", 6, 1), ("b", 6, 1), ("c", 16, 4)],
        [("a", 7, 1), ("b", 7, 1), ("c", 20, 1)],
    ]
    for chunks in expected:
        work, changed = step(sched, runner)
        assert chunks_of(work) == chunks
    assert runner.last_samples == [True, True, True]
    assert sched.get_request("c") is None  # finished: 2 tokens
    assert [r.request_id for r in changed] == ["a", "b", "c"]


def test_chunked_prefill_progression() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=8), FakeRunner()
    r = make_request("r", 21, max_tokens=2)
    sched.add_request(r)
    progress = []
    for _ in range(3):
        work, changed = step(sched, runner)
        progress.append((chunks_of(work), runner.last_samples,
                         r.num_computed_tokens, r.num_output_tokens, len(changed)))
    assert progress == [
        ([("r", 0, 8)], [False], 8, 0, 0),
        ([("r", 8, 8)], [False], 16, 0, 0),
        ([("r", 16, 5)], [True], 21, 1, 1),
    ]
    assert r.output_token_ids == expected_output(r.prompt_token_ids, 1)


def test_max_num_seqs_caps_running_requests() -> None:
    sched, runner = make_scheduler(max_num_seqs=2), FakeRunner()
    for rid, max_tokens in (("a", 1), ("b", 3), ("c", 1)):
        sched.add_request(make_request(rid, 4, max_tokens=max_tokens))
    assert chunks_of(step(sched, runner)[0]) == [("a", 0, 4), ("b", 0, 4)]
    assert (sched.num_running, sched.num_waiting) == (1, 1)  # a finished after one token
    assert chunks_of(step(sched, runner)[0]) == [("b", 4, 1), ("c", 0, 4)]


def test_disabled_chunked_prefill_waits_for_room_for_the_whole_prompt() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=16, max_model_len=16,
                                   chunked=False), FakeRunner()
    sched.add_request(make_request("a", 10))
    sched.add_request(make_request("b", list(range(20, 30))))
    sched.add_request(make_request("c", [40, 41]))  # fits, but FCFS does not jump the queue
    assert chunks_of(step(sched, runner)[0]) == [("a", 0, 10)]
    assert chunks_of(step(sched, runner)[0]) == [("a", 10, 1), ("b", 0, 10), ("c", 0, 2)]
    chunked = make_scheduler(max_num_batched_tokens=16, max_model_len=16, hold=False)
    chunked.add_request(make_request("a", 10))
    chunked.add_request(make_request("b", list(range(20, 30))))
    assert chunks_of(step(chunked, runner)[0]) == [("a", 0, 10), ("b", 0, 6)]


@pytest.mark.parametrize("hold", [True, False])
def test_a_step_that_gives_a_first_token_starts_no_prompt_it_cannot_finish(hold: bool) -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=16, hold=hold), FakeRunner()
    sched.add_request(make_request("a", 10, max_tokens=8))
    sched.add_request(make_request("b", list(range(20, 30)), max_tokens=8))  # 10 > 6 left
    sched.add_request(make_request("c", [40, 41], max_tokens=8))  # fits, but FCFS keeps order
    first, _ = step(sched, runner)
    if not hold:  # packed: b's first 6 tokens ride along and a's first token waits for them
        assert chunks_of(first) == [("a", 0, 10), ("b", 0, 6)]
        return
    assert chunks_of(first) == [("a", 0, 10)]
    # A prompt that fits whole still joins a step that gives first tokens.
    assert chunks_of(step(sched, runner)[0]) == [("a", 10, 1), ("b", 0, 10), ("c", 0, 2)]
    # Steps of decodes only still start a prompt longer than what is left of the budget ...
    sched.add_request(make_request("d", list(range(50, 80)), max_tokens=8))
    assert chunks_of(step(sched, runner)[0]) == [("a", 11, 1), ("b", 10, 1), ("c", 2, 1),
                                                 ("d", 0, 13)]
    # ... and a running prompt's last chunk holds the next one back too.
    sched.add_request(make_request("e", list(range(90, 100)), max_tokens=8))
    assert chunks_of(step(sched, runner)[0]) == [("a", 12, 1), ("b", 11, 1), ("c", 3, 1),
                                                 ("d", 13, 13)]
    assert chunks_of(step(sched, runner)[0]) == [("a", 13, 1), ("b", 12, 1), ("c", 4, 1),
                                                 ("d", 26, 4)]
    assert chunks_of(step(sched, runner)[0]) == [("a", 14, 1), ("b", 13, 1), ("c", 5, 1),
                                                 ("d", 30, 1), ("e", 0, 10)]


# -- stopping ----------------------------------------------------------------------------------

def test_max_model_len_finishes_with_length() -> None:
    sched, runner = make_scheduler(max_model_len=10), FakeRunner()
    r = make_request("r", 7, max_tokens=None)
    sched.add_request(r)
    run_to_end(sched, runner)
    assert (r.status, r.num_tokens, r.num_output_tokens) == (RequestStatus.FINISHED_LENGTH, 10, 3)
    assert r.output_token_ids == expected_output(r.prompt_token_ids, 3)


@pytest.mark.parametrize(("params", "eos", "outputs", "status", "stop_reason"), [
    (SamplingParams.greedy(9), (5,), [1, 5], RequestStatus.FINISHED_STOPPED, None),
    (SamplingParams.greedy(3, ignore_eos=True), (5,), [1, 5, 2], RequestStatus.FINISHED_LENGTH,
     None),
    (SamplingParams.greedy(9, stop_token_ids=(2,)), (), [1, 5, 2], RequestStatus.FINISHED_STOPPED,
     2),
    (SamplingParams.greedy(9, stop_token_ids=(2,), ignore_eos=True), (5,), [1, 5, 2],
     RequestStatus.FINISHED_STOPPED, 2),
    (SamplingParams.greedy(9, min_tokens=3), (5,), [5, 5, 5], RequestStatus.FINISHED_STOPPED,
     None),
    (SamplingParams.greedy(4), (), [1, 5, 2, 7], RequestStatus.FINISHED_LENGTH, None),
])
def test_stop_conditions(params: SamplingParams, eos: tuple[int, ...], outputs: list[int],
                         status: RequestStatus, stop_reason: int | None) -> None:
    sched = make_scheduler()
    runner = FakeRunner(script={"r": [1, 5, 2, 7, 8, 9, 10, 11, 12]} if params.min_tokens == 0
                        else {"r": [5] * 9})
    r = make_request("r", 6, eos=eos, params=params)
    sched.add_request(r)
    run_to_end(sched, runner)
    assert (r.output_token_ids, r.status, r.stop_reason) == (outputs, status, stop_reason)
    assert sched.block_manager.num_free_blocks == 64


def test_finished_ids_are_reported_once() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    sched.add_request(make_request("a", 4, max_tokens=1))
    sched.add_request(make_request("b", 4, max_tokens=2))
    work, changed = step(sched, runner)
    assert work.finished_ids == [] and [r.request_id for r in changed] == ["a", "b"]
    work, _ = step(sched, runner)
    assert work.finished_ids == ["a"]
    work = sched.schedule()
    assert work.finished_ids == ["b"] and work.is_empty
    assert sched.schedule().finished_ids == []


def test_failed_request_finishes_with_error_and_leaves_no_cached_garbage() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    a, b = make_request("a", 9), make_request("b", [50, 51, 52, 53])
    sched.add_request(a)
    sched.add_request(b)
    runner.fail = {"a"}
    _, changed = step(sched, runner)
    assert changed == [a, b] and a.status == RequestStatus.FINISHED_ERROR
    assert a.output_token_ids == [] and b.num_output_tokens == 1
    bm = sched.block_manager
    assert all(bm.cached_block_id(h) is None for h in a.block_hashes)
    assert sched.schedule().finished_ids == ["a"]


def test_finish_request_by_the_engine() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    r = make_request("r", 6, max_tokens=9)
    sched.add_request(r)
    step(sched, runner)
    sched.finish_request(r, RequestStatus.FINISHED_STOPPED, "</s>")
    sched.finish_request(r, RequestStatus.FINISHED_ABORTED)  # already done: ignored
    assert (r.status, r.stop_reason) == (RequestStatus.FINISHED_STOPPED, "</s>")
    assert not sched.has_unfinished_requests() and sched.block_manager.num_used_blocks == 0
    assert sched.schedule().finished_ids == ["r"]
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_request(r, RequestStatus.RUNNING)


def test_add_request_validation() -> None:
    sched = make_scheduler(max_model_len=8)
    sched.add_request(make_request("r", 8))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add_request(make_request("r", 2))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request("long", 9))


# -- ordering ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "order"), [("fcfs", ["a", "b", "c", "d"]),
                                               ("priority", ["c", "b", "d", "a"])])
def test_admission_order(policy: str, order: list[str]) -> None:
    sched, runner = make_scheduler(max_num_seqs=1, policy=policy), FakeRunner()
    for rid, priority, arrival in (("a", 5, 0.0), ("b", 0, 2.0), ("c", 0, 1.0), ("d", 0, 2.0)):
        sched.add_request(make_request(rid, 3, max_tokens=1, priority=priority,
                                       arrival_time=arrival))
    admitted = [chunks_of(w)[0][0] for w in run_to_end(sched, runner)]
    assert admitted == order


# -- preemption --------------------------------------------------------------------------------

def three_decoding(policy: str = "fcfs", num_blocks: int = 6,
                   priorities: tuple[int, int, int] = (0, 0, 0)
                   ) -> tuple[Scheduler, FakeRunner, list[Request]]:
    """Three 4-token prompts decoding until each holds two blocks and fills the second."""
    sched, runner = make_scheduler(num_blocks=num_blocks, policy=policy), FakeRunner()
    requests = [make_request(rid, [10 * i + j for j in range(1, 5)], max_tokens=8,
                             priority=prio, arrival_time=float(i))
                for i, (rid, prio) in enumerate(zip("abc", priorities, strict=True))]
    for r in requests:
        sched.add_request(r)
    for _ in range(5):  # prompts, then tokens 4..7
        work, _ = step(sched, runner)
        assert not work.preempted
    return sched, runner, requests


def test_fcfs_preempts_the_last_running_request() -> None:
    sched, runner, (a, b, c) = three_decoding()
    bm = sched.block_manager
    assert [bm.block_table(r.request_id) for r in (a, b, c)] == [[0, 3], [1, 4], [2, 5]]
    work, _ = step(sched, runner)  # token 8 of each needs a third block; none is free
    assert work.preempted == [c]
    assert chunks_of(work) == [("a", 8, 1), ("b", 8, 1)]
    # c's blocks went back tail first ([5, 2]); a and b took them in that order.
    assert (bm.block_table("a"), bm.block_table("b")) == ([0, 3, 5], [1, 4, 2])
    assert (c.status, c.num_computed_tokens, c.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert bm.block_table("c") == [] and sched.waiting == [c]
    assert c.num_tokens == 9  # prompt + 5 outputs: all recomputed when it resumes


def test_a_request_that_cannot_grow_preempts_itself_and_stops_the_running_pass() -> None:
    sched, runner = make_scheduler(num_blocks=5), FakeRunner()
    a, b = make_request("a", 6, max_tokens=8), make_request("b", [9, 8, 7, 6, 5, 4], max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(3):
        step(sched, runner)
    work, _ = step(sched, runner)  # token 8: a takes the last block, b has none left
    assert work.preempted == [b] and chunks_of(work) == [("a", 8, 1)]
    work, _ = step(sched, runner)  # b is not readmitted in the step it was preempted ...
    assert chunks_of(work) == [("a", 9, 1)] and not work.preempted
    assert sched.num_waiting == 1  # ... and now waits: its hit + one new block do not fit


def test_priority_preempts_the_least_urgent_request() -> None:
    sched, runner, (_, b, _) = three_decoding("priority", priorities=(0, 2, 1))
    work, _ = step(sched, runner)
    assert work.preempted == [b] and chunks_of(work) == [("a", 8, 1), ("c", 8, 1)]
    bm = sched.block_manager
    # Admitted in priority order a, c, b: b held [2, 5] and gave them back as [5, 2].
    assert (bm.block_table("a"), bm.block_table("c")) == ([0, 3, 5], [1, 4, 2])


def test_priority_victim_already_scheduled_this_step_gives_back_its_chunk() -> None:
    sched, runner = make_scheduler(num_blocks=7, policy="priority"), FakeRunner()
    a = make_request("a", [1, 2, 3, 4], max_tokens=9, priority=1, arrival_time=0.0)
    sched.add_request(a)
    step(sched, runner)
    for i, rid in enumerate("bc"):  # more urgent, but admitted after a: a runs first
        sched.add_request(make_request(rid, [10 * (i + 1) + j for j in range(4)], max_tokens=9,
                                       arrival_time=1.0 + i))
    for _ in range(5):
        assert not step(sched, runner)[0].preempted
    bm = sched.block_manager
    assert [bm.block_table(r) for r in "abc"] == [[0, 1, 6], [2, 4], [3, 5]]
    work = sched.schedule()  # a decodes into its last block; b then needs one and none is free
    assert work.preempted == [a] and chunks_of(work) == [("b", 8, 1), ("c", 8, 1)]
    assert [r.request_id for r in sched.running] == ["b", "c"]
    assert (bm.block_table("b"), bm.block_table("c")) == ([2, 4, 6], [3, 5, 1])
    assert bm.blocks[0].block_hash is not None  # a's computed head stays cached
    sched.update_from_output(work, runner.execute(work))
    run_to_end(sched, runner)
    assert a.output_token_ids == expected_output(a.prompt_token_ids, 9)


def workload() -> list[Request]:
    return [make_request(f"r{i}", [(7 * i + j) % 13 + 1 for j in range(3 + 3 * i)],
                         max_tokens=6 + i) for i in range(5)]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_does_not_change_results(policy: str) -> None:
    results = []
    for num_blocks in (64, 8):
        sched, runner = make_scheduler(num_blocks=num_blocks, policy=policy), FakeRunner()
        requests = workload()
        for r in requests:
            sched.add_request(r)
        steps = run_to_end(sched, runner)
        results.append([r.all_token_ids for r in requests])
        assert sum(len(w.preempted) for w in steps) > 0 or num_blocks == 64
        assert sched.block_manager.num_free_blocks == num_blocks
    assert results[0] == results[1]
    assert results[0] == [r.prompt_token_ids + expected_output(r.prompt_token_ids, 6 + i)
                          for i, r in enumerate(workload())]


# -- aborts ------------------------------------------------------------------------------------

def test_abort_while_waiting() -> None:
    sched = make_scheduler()
    r = make_request("r", 4)
    sched.add_request(r)
    assert sched.abort_requests(["r", "unknown"]) == [r]
    assert (r.status, sched.num_waiting, sched.get_request("r")) == (
        RequestStatus.FINISHED_ABORTED, 0, None)
    work = sched.schedule()
    assert work.finished_ids == ["r"] and work.is_empty
    assert sched.schedule().finished_ids == []
    assert sched.abort_requests(["r"]) == []


def test_abort_while_running_between_schedule_and_update() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    a, b = make_request("a", 6), make_request("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    work = sched.schedule()
    sched.abort_requests(["a"])
    changed = sched.update_from_output(work, runner.execute(work))
    assert changed == [b] and a.num_output_tokens == 1 and a.num_computed_tokens == 6
    assert sched.block_manager.block_table("a") == [] and sched.running == [b]
    assert sched.schedule().finished_ids == ["a"]


def test_abort_while_preempted() -> None:
    sched, runner, (_, _, c) = three_decoding()
    step(sched, runner)
    assert c.status == RequestStatus.PREEMPTED
    assert sched.abort_requests(["c"]) == [c]
    assert sched.num_waiting == 0 and c.status == RequestStatus.FINISHED_ABORTED
    assert sched.schedule().finished_ids == ["c"]
    sched.abort_requests(["a", "b"])
    assert sched.block_manager.num_free_blocks == 6 and not sched.has_unfinished_requests()


# -- n > 1 -------------------------------------------------------------------------------------

def test_siblings_wait_for_the_leader_then_share_its_prompt_blocks() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    prompt = list(range(1, 11))
    leader = make_request("p-0", prompt)
    siblings = [make_request(f"p-{i}", prompt, wait_for=leader) for i in (1, 2)]
    for r in (leader, *siblings, make_request("other", 3)):
        sched.add_request(r)
    work, _ = step(sched, runner)
    assert chunks_of(work) == [("p-0", 0, 10), ("other", 0, 3)]  # siblings skipped in place
    work, _ = step(sched, runner)
    assert chunks_of(work) == [("p-0", 10, 1), ("other", 3, 1), ("p-1", 8, 2), ("p-2", 8, 2)]
    bm = sched.block_manager
    shared = bm.block_table("p-0")[:2]
    assert [bm.block_table(s.request_id)[:2] for s in siblings] == [shared, shared]
    assert [bm.blocks[b].ref_cnt for b in shared] == [3, 3]
    assert [r.num_cached_tokens for r in (leader, *siblings)] == [0, 8, 8]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10 + 3 + 10 + 10, 16)
    run_to_end(sched, runner)
    assert leader.output_token_ids == siblings[0].output_token_ids == siblings[1].output_token_ids


def test_siblings_of_a_chunked_leader_wait_for_its_whole_prompt() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=6), FakeRunner()
    leader = make_request("p-0", 10)
    sibling = make_request("p-1", 10, wait_for=leader)
    sched.add_request(leader)
    sched.add_request(sibling)
    sched.add_request(make_request("other", 2))
    assert chunks_of(step(sched, runner)[0]) == [("p-0", 0, 6)]
    assert chunks_of(step(sched, runner)[0]) == [("p-0", 6, 4), ("other", 0, 2)]
    assert chunks_of(step(sched, runner)[0]) == [("p-0", 10, 1), ("other", 2, 1), ("p-1", 8, 2)]
