"""A hypothesis property test of the scheduler and block manager: random adds (shared
prefixes, images, priorities, n > 1), steps, aborts and failed steps keep every block
invariant, and once everything has finished every block is free again.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.engine.request import MMSpan, Request, RequestStatus
from glmv.engine.scheduler import Scheduler
from tests.engine.fakes import (
    FakeRunner,
    expected_output,
    make_request,
    make_scheduler,
    step,
)

BASE = [(i * 5) % 11 + 1 for i in range(40)]  # shared prefix material, so hits happen

# ("add", shared prefix len, own tail len, image hash, image offset, max_tokens, priority, n)
add_op = st.tuples(st.just("add"), st.sampled_from([0, 6, 9, 13, 24]), st.integers(0, 6),
                   st.sampled_from([None, None, "x", "y"]), st.sampled_from([2, 9, 20]),
                   st.integers(1, 12),
                   st.integers(0, 2), st.sampled_from([1, 1, 1, 2, 3]))
step_op = st.tuples(st.just("step"))
operations = st.lists(st.one_of(add_op, step_op, step_op,
                                st.tuples(st.just("abort"), st.integers(0, 50)),
                                st.tuples(st.just("fail"), st.integers(0, 50))),
                      max_size=50)


def add_random(sched: Scheduler, requests: list[Request], op: tuple) -> None:
    """One prompt from an add_op, as n completions (n > 1: siblings wait for the first)."""
    _, shared, tail, image, offset, max_tokens, priority, n = op
    prompt = BASE[:shared] + [100 + len(requests)] * (tail or int(not shared))
    offset = min(offset, len(prompt) - 1)
    spans = (MMSpan(offset, min(2, len(prompt) - offset), image, 0),) if image else ()
    leader = None
    for i in range(n):
        r = make_request(f"r{len(requests)}-{i}", prompt, max_tokens, spans, priority=priority,
                         wait_for=leader)
        leader = leader or r
        requests.append(r)
        sched.add_request(r)


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    free = bm.free_block_ids()
    assert len(free) == len(set(free)) and bm.num_used_blocks + len(free) == bm.num_blocks
    holders = [0] * bm.num_blocks
    for r in sched.running:
        table = bm.block_table(r.request_id)
        assert len(table) == len(set(table))
        assert len(table) * bm.block_size >= r.num_computed_tokens
        for block_id in table:
            holders[block_id] += 1
    assert [b.ref_cnt for b in bm.blocks] == holders
    assert {i for i, n in enumerate(holders) if n == 0} == set(free)
    for r in sched.waiting:
        assert bm.block_table(r.request_id) == [] and r.num_computed_tokens == 0
    for b in bm.blocks:
        assert b.block_hash is None or bm.cached_block_id(b.block_hash) == b.block_id
    assert sched.num_running <= sched.config.max_num_seqs


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, num_blocks=st.integers(4, 12), budget=st.integers(1, 24),
       max_num_seqs=st.integers(1, 4), policy=st.sampled_from(["fcfs", "priority"]),
       prefix=st.booleans(), chunked=st.booleans())
def test_random_traffic_keeps_block_invariants(ops: list[tuple], num_blocks: int, budget: int,
                                               max_num_seqs: int, policy: str, prefix: bool,
                                               chunked: bool) -> None:
    sched = make_scheduler(num_blocks=num_blocks, prefix=prefix, max_model_len=48,
                           max_num_batched_tokens=budget if chunked else 48,
                           max_num_seqs=max_num_seqs, policy=policy, chunked=chunked)
    runner, requests = FakeRunner(), list[Request]()
    for op in ops:
        if op[0] == "add":
            add_random(sched, requests, op)
        elif op[0] == "step":
            step(sched, runner)
            runner.fail.clear()
        elif requests:
            request_id = requests[op[1] % len(requests)].request_id
            if op[0] == "abort":
                sched.abort_requests([request_id])
            else:  # its next chunk fails
                runner.fail.add(request_id)
        check_invariants(sched)
    runner.fail.clear()
    for _ in range(200):  # drain; a request too big for the cache would spin, so cap it
        if not sched.has_unfinished_requests():
            break
        step(sched, runner)
        check_invariants(sched)
    sched.abort_requests([r.request_id for r in requests])
    check_invariants(sched)
    bm = sched.block_manager
    assert (bm.num_free_blocks, bm.usage(), sched.num_waiting) == (num_blocks, 0.0, 0)
    for r in requests:
        assert r.is_finished
        # The rest ran to max_tokens, with exactly the tokens the fake model gives.
        if r.status not in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR):
            assert r.output_token_ids == expected_output(r.prompt_token_ids,
                                                         r.sampling_params.max_tokens or 0)
