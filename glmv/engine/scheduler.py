"""Which tokens of which requests run this step (vLLM v1's token-budget scheduler).

Pure Python (no torch). One model: every request has `num_computed_tokens`, and a step computes
some of the rest; chunked prefill, prefix hits, resumed preemptions and decodes take one path.

    schedule():  budget = max_num_batched_tokens
      1. running requests, in order: the rest of their tokens, capped by the budget; when blocks
         run out, preempt (FCFS: the last running; priority: the least urgent) and retry
      2. if nobody was preempted: waiting requests (prefix hit first) while seats and budget
         last; a prompt that would only start (not finish) in a step that already gives some
         request its first token waits for the next step (`hold_partial_prefills`)
    update_from_output(): advance num_computed_tokens, cache the blocks that filled up (only
         now: the KV exists), append sampled tokens, finish on stops
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable

from glmv.engine.block_manager import BlockManager
from glmv.engine.config import SchedulerConfig
from glmv.engine.outputs import RunnerOutput, ScheduledChunk, SchedulerOutput
from glmv.engine.request import Request, RequestStatus


class Scheduler:
    """Owns the waiting and running queues and every unfinished request's place in them.

    Invariants: an unfinished request is in exactly one of `waiting` (WAITING or PREEMPTED,
    holds no blocks, num_computed_tokens 0) and `running` (RUNNING, holds blocks covering its
    computed tokens); `len(running) <= max_num_seqs`; finished requests are in neither and
    hold no blocks. `num_computed_tokens` only moves in update_from_output (and to the prefix
    hit when a request is admitted, and to 0 on preemption).
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Request] = []  # FCFS: admission order; priority: sorted by _key
        self.running: list[Request] = []  # admission order (the FCFS victim is the last)
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._order: dict[str, int] = {}  # request id -> insertion counter (ties, priority)
        self._counter = itertools.count()
        self._finished_ids: list[str] = []  # finished since the last schedule()

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def _key(self, request: Request) -> tuple[int, float, int]:
        """Priority order: lower priority value first, then earlier arrival, then insertion."""
        return request.priority, request.arrival_time, self._order[request.request_id]

    # -- requests in and out -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING, no tokens computed)."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        if request.num_tokens > self.config.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} tokens, "
                             f"more than max_model_len ({self.config.max_model_len})")
        self._requests[request.request_id] = request
        self._order[request.request_id] = next(self._counter)
        request.status = RequestStatus.WAITING
        self._enqueue(request, front=False)

    def _enqueue(self, request: Request, front: bool) -> None:
        if self.config.policy == "priority":
            bisect.insort(self.waiting, request, key=self._key)
        elif front:
            self.waiting.insert(0, request)
        else:
            self.waiting.append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Cancel requests wherever they are (unknown or finished ids are ignored); their
        blocks are freed now and their ids go out in the next SchedulerOutput.finished_ids."""
        aborted = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted

    def finish_request(self, request: Request, status: RequestStatus,
                       stop_reason: int | str | None = None) -> None:
        """Finish a request for the engine (a stop string, an error); ignored if already done."""
        if not status.is_finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        if self._requests.get(request.request_id) is not request:
            return
        if stop_reason is not None:
            request.stop_reason = stop_reason
        self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus,
                num_computed_tokens: int | None = None) -> None:
        """num_computed_tokens: tokens whose KV is trustworthy (default: all computed ones)."""
        # check_stop may already have set a finished status, so look in both queues.
        queue = self.running if request in self.running else self.waiting
        queue.remove(request)
        self.block_manager.free(request, num_computed_tokens)
        request.status = status
        del self._requests[request.request_id]
        del self._order[request.request_id]
        self._finished_ids.append(request.request_id)

    # -- scheduling ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks within the token budget (see the module docstring)."""
        output = SchedulerOutput(chunks=[])
        budget = self._schedule_running(output, self.config.max_num_batched_tokens)
        if not output.preempted:
            self._schedule_waiting(output, budget)
        output.finished_ids, self._finished_ids = self._finished_ids, []
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        """Step 1: running requests in order; returns the budget left."""
        scheduled: dict[str, ScheduledChunk] = {}
        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget,
                          self.config.max_model_len - request.num_computed_tokens)
            table = self.block_manager.allocate_slots(request, num_new)
            while table is None:
                victim = self._pick_victim()
                if self.running.index(victim) < idx:
                    idx -= 1  # the priority victim may sit before us (already scheduled)
                chunk = scheduled.pop(victim.request_id, None)
                if chunk is not None:  # give back what it had been granted this step
                    output.chunks = [c for c in output.chunks if c is not chunk]
                    budget += chunk.num_tokens
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is request:
                    return budget
                table = self.block_manager.allocate_slots(request, num_new)
            chunk = ScheduledChunk(request, request.num_computed_tokens, num_new, table)
            scheduled[request.request_id] = chunk
            output.chunks.append(chunk)
            budget -= num_new
            idx += 1
        return budget

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=self._key)
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        """Take the request's blocks; it recomputes prompt + outputs so far when readmitted."""
        self.running.remove(request)
        self.block_manager.free(request)  # its computed blocks stay cached: a cheap resume
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._enqueue(request, front=True)

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        """Step 2: admit waiting requests while seats, budget and blocks last."""
        config = self.config
        idx = 0
        while (idx < len(self.waiting) and len(self.running) < config.max_num_seqs
               and budget > 0):
            request = self.waiting[idx]
            if self._must_wait(request):
                idx += 1
                continue
            computed_blocks: list[int] = []
            num_hit = 0
            if request.num_computed_tokens == 0:
                computed_blocks, num_hit = self.block_manager.get_computed_blocks(request)
            num_computed = request.num_computed_tokens + num_hit
            num_new = min(request.num_tokens, config.max_model_len) - num_computed
            if num_new > budget and (not config.enable_chunked_prefill or (
                    config.hold_partial_prefills and _gives_first_tokens(output))):
                break
            num_new = min(num_new, budget)
            table = self.block_manager.allocate_slots(request, num_new, computed_blocks)
            if table is None:
                break
            del self.waiting[idx]
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.chunks.append(ScheduledChunk(request, num_computed, num_new, table))
            budget -= num_new

    @staticmethod
    def _must_wait(request: Request) -> bool:
        """An n > 1 sibling waits until its leader has computed the shared prompt."""
        leader = request.wait_for
        return (leader is not None and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    # -- results -------------------------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[Request]:
        """Apply one step's results; returns the requests that got a token or finished."""
        changed = []
        for chunk in output.chunks:
            request = chunk.request
            if (request.status != RequestStatus.RUNNING
                    or self._requests.get(request.request_id) is not request):
                continue  # aborted or finished since schedule()
            samples = chunk.samples  # before appending: the chunk reached the last token
            request.num_computed_tokens += chunk.num_tokens
            request_id = request.request_id
            if request_id in runner_output.failed:  # its chunk's KV cannot be trusted
                self._finish(request, RequestStatus.FINISHED_ERROR, chunk.start)
                changed.append(request)
                continue
            # The KV is written now: its full blocks may serve prefix hits from here on.
            self.block_manager.cache_computed_blocks(request)
            if samples:
                if request_id not in runner_output.sampled:
                    # A runner bug; failing the request beats leaving it stuck forever.
                    self._finish(request, RequestStatus.FINISHED_ERROR, chunk.start)
                else:
                    request.append_output_token(runner_output.sampled[request_id])
                    if request.check_stop(self.config.max_model_len):
                        self._finish(request, request.status)
                changed.append(request)
        return changed


def _gives_first_tokens(output: SchedulerOutput) -> bool:
    """Some chunk of this step finishes a prompt: its request gets its first token."""
    return any(c.samples and c.request.num_output_tokens == 0 for c in output.chunks)
