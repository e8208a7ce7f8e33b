"""Paged KV cache bookkeeping: which blocks each request holds, and the prefix cache.

Pure Python (no torch): the runner owns the tensors, this module only hands out block ids.

    block table of a request (block_size 4):   [ 7 | 2 | 9 ]
    tokens:                                    |0123|4567|89..|
    token t lives in block table[t // block_size], slot t % block_size

A full block's KV depends on every token before it (and on the pictures behind its image
tokens), so it is keyed by a chained hash:

    hash_i = H(hash_{i-1} or SEED, token ids of block i,
               (content hash, offset - block start) of every media span overlapping block i)

The offset makes the key exact: the same picture shifted by a token feeds different rows of
its features to the block's tokens, so it must not share the block.

A block enters the hash map only once its KV is written (cache_computed_blocks after the step,
or free), never when it is allocated: a failed forward or a preempted chunk cannot leave a
cached block holding garbage, and no request can hit a block another one is still computing.

Free blocks sit in one LRU queue. A freed block keeps its hash and stays in the hash map until
the queue hands it out again, so a later request with the same prefix can revive it.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from glmv.engine.request import Request

#: A media span as a block hash sees it: (content hash, span offset - block start).
MMItem = tuple[str, int]

#: Parent of a request's first block, so the first block's hash is not H(tokens) alone.
_SEED = hashlib.blake2b(b"glmv-prefix-cache-v1", digest_size=32).digest()


def hash_block(parent: bytes | None, token_ids: Sequence[int],
               mm_items: Sequence[MMItem] = ()) -> bytes:
    """The chained hash of one full block: a stable byte encoding (never Python's hash()).

    mm_items: (content hash, span offset relative to the block start) of each media span
    overlapping the block, in prompt order.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(_SEED if parent is None else parent)
    # Length prefixes keep the encoding unambiguous between tokens and media items.
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(mm_items)))
    for content_hash, offset in mm_items:
        data = content_hash.encode()
        h.update(struct.pack("<qI", offset, len(data)))
        h.update(data)
    return h.digest()


def _mm_items(request: Request, start: int, end: int) -> tuple[MMItem, ...]:
    """(content hash, offset - start) of the media spans overlapping tokens [start, end)."""
    return tuple((s.content_hash, s.offset - start) for s in request.mm_spans
                 if s.offset < end and s.end > start)


@dataclass
class KVBlock:
    """One KV block: how many requests hold it, and its prefix-cache key if it has one.

    Invariant: `block_hash` is not None exactly when the manager's hash map sends that hash to
    this block; `ref_cnt == 0` exactly when the block is in the free queue.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass
class BlockManagerStats:
    """Prefix-cache counters, in tokens, since the manager was built."""

    prefix_cache_queries: int = 0  # tokens of the requests admitted (each admission counts)
    prefix_cache_hits: int = 0  # of those, tokens served by cached blocks

    @property
    def hit_rate(self) -> float:
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else 0.0


class BlockManager:
    """Owns the KV blocks: every request's block table, ref counts, the LRU free queue and the
    prefix-cache hash map.

    Invariants: a block is either referenced (ref_cnt > 0, in no free queue) or free (ref_cnt
    0, in the free queue exactly once); num_used_blocks + num_free_blocks == num_blocks; a
    block's ref_cnt is the number of block tables holding it.
    """

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]  # indexed by block id; read-only
        # Front = next to hand out (least recently freed). Values unused; OrderedDict gives O(1)
        # removal when a prefix hit revives a cached free block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> id of the block holding that KV
        self._tables: dict[str, list[int]] = {}  # request id -> block table
        # request id -> how many leading blocks of its table went through hash registration
        self._num_registered: dict[str, int] = {}
        self.stats = BlockManagerStats()

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, cached ones included (they can be evicted)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        """Fraction of blocks some request holds."""
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_queries(self) -> int:
        return self.stats.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.stats.prefix_cache_hits

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] when it holds none)."""
        return list(self._tables.get(request_id, ()))

    def free_block_ids(self) -> list[int]:
        """The free queue, next to be handed out first (for tests and debugging)."""
        return list(self._free)

    def cached_block_id(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    # -- prefix cache --------------------------------------------------------------------------

    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to every full block of request.all_token_ids."""
        bs = self.block_size
        hashes = request.block_hashes
        for i in range(len(hashes), request.num_tokens // bs):
            start, end = i * bs, (i + 1) * bs
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, request.all_token_ids[start:end],
                                     _mm_items(request, start, end)))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached run of the request's leading full blocks: (block ids, tokens).

        Never covers the last token (the step must compute it to get its logits). Takes no
        references; pass the ids to allocate_slots right away.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hit.append(block_id)
        return hit, len(hit) * self.block_size

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False, nothing changed) while blocks are held."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    # -- allocation ----------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> list[int] | None:
        """Grow the request's table to cover its computed tokens (plus `computed_blocks`, the
        prefix hit of its first scheduling) and `num_new_tokens` more.

        Returns the whole table (a copy), or None, changing nothing, when too few blocks are
        free. The new blocks are not cached yet: see cache_computed_blocks.
        """
        computed = computed_blocks or []
        table = self._tables.get(request.request_id) or []
        if computed and table:
            raise ValueError(f"{request.request_id}: computed blocks are only for a request "
                             "that holds none")
        num_tokens = (request.num_computed_tokens + len(computed) * self.block_size
                      + num_new_tokens)
        num_needed = -(-num_tokens // self.block_size) - len(table) - len(computed)
        # Reviving a cached free block takes it out of the free queue too.
        num_revived = sum(1 for b in computed if self.blocks[b].ref_cnt == 0)
        if max(num_needed, 0) > len(self._free) - num_revived:
            return None
        if not table:  # first allocation (again, after a preemption)
            self._tables[request.request_id] = table
            self._num_registered[request.request_id] = len(computed)
            if self.enable_prefix_caching:
                # Counted on admission, not per lookup: a request that waits for blocks looks
                # the cache up again every step.
                self.stats.prefix_cache_queries += request.num_tokens
                self.stats.prefix_cache_hits += len(computed) * self.block_size
        for block_id in computed:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1
            table.append(block_id)
        for _ in range(num_needed):
            table.append(self._pop_free().block_id)
        return list(table)

    def _pop_free(self) -> KVBlock:
        """Hand out the least recently freed block; its cached KV (if any) is evicted."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def cache_computed_blocks(self, request: Request, num_tokens: int | None = None) -> None:
        """Put the request's blocks that are full at `num_tokens` (default: its computed
        tokens) into the hash map; call it once their KV is written."""
        table = self._tables.get(request.request_id)
        if not self.enable_prefix_caching or not table:
            return
        num_tokens = request.num_computed_tokens if num_tokens is None else num_tokens
        num_full = min(num_tokens, request.num_tokens, len(table) * self.block_size) // (
            self.block_size)
        first = self._num_registered[request.request_id]
        if num_full <= first:
            return
        self.update_block_hashes(request)
        for i in range(first, num_full):
            block = self.blocks[table[i]]
            block_hash = request.block_hashes[i]
            # Another block may already hold the same KV (two identical prompts computed side
            # by side); the first stays the cached copy and this one stays unhashed.
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request, num_computed_tokens: int | None = None) -> None:
        """Drop the request's references. Blocks nobody holds go to the END of the free queue,
        tail first (so a request's tail is evicted before its head), keeping their hashes.

        num_computed_tokens: tokens whose KV is written (default: request.num_computed_tokens);
        the blocks they fill are cached first. Pass less when a step failed.
        """
        self.cache_computed_blocks(request, num_computed_tokens)
        table = self._tables.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if not table:
            return
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
