"""BlockManager: exact block ids, ref counts, free order, LRU eviction and the media-aware
prefix cache (block_size 4 throughout, so token t sits in block t // 4)."""

from __future__ import annotations

import pytest

from glmv.engine.block_manager import BlockManager, hash_block
from glmv.engine.request import MMSpan, Request
from glmv.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int], spans: tuple[MMSpan, ...] = ()) -> Request:
    return Request(request_id, tokens, SamplingParams.greedy(max_tokens=8), mm_spans=spans)


def image(offset: int, length: int, content_hash: str) -> tuple[MMSpan, ...]:
    return (MMSpan(offset, length, content_hash, 0),)


def compute(bm: BlockManager, request: Request, num_tokens: int | None = None,
            hit: bool = False) -> list[int]:
    """Allocate and 'compute' the request's remaining tokens (or num_tokens of them)."""
    computed, num_hit = bm.get_computed_blocks(request) if hit else ([], 0)
    if num_tokens is None:
        num_tokens = request.num_tokens - request.num_computed_tokens - num_hit
    table = bm.allocate_slots(request, num_tokens, computed or None)
    assert table is not None
    request.num_computed_tokens += num_hit + num_tokens  # as the scheduler does, afterwards
    bm.cache_computed_blocks(request)  # the step ran: its KV is written
    return table


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_cnt for b in bm.blocks]


def snapshot(bm: BlockManager) -> tuple[object, ...]:
    return (bm.free_block_ids(), refs(bm), [b.block_hash for b in bm.blocks],
            dict(bm._cached), {k: list(v) for k, v in bm._tables.items()})


def test_allocation_takes_free_blocks_in_order() -> None:
    bm = BlockManager(8, BS)
    r1, r2 = make_request("r1", list(range(10))), make_request("r2", list(range(100, 105)))
    assert compute(bm, r1) == [0, 1, 2]
    assert compute(bm, r2) == [3, 4]
    assert refs(bm) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.free_block_ids() == [5, 6, 7]
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage()) == (5, 3, 5 / 8)
    assert bm.block_table("r1") == [0, 1, 2] and bm.block_table("nope") == []
    # Only full blocks are hashed: r1 has two, r2 one.
    assert [b.block_hash is not None for b in bm.blocks[:5]] == [True, True, False, True, False]


def test_decode_grows_the_table_one_block_at_a_time_and_hashes_output_blocks() -> None:
    bm = BlockManager(8, BS)
    r = make_request("r", list(range(10)))
    compute(bm, r)
    for token in (50, 51):  # tokens 10, 11 fill block 2
        r.append_output_token(token)
        assert bm.allocate_slots(r, 1) == [0, 1, 2]
        assert bm.blocks[2].block_hash is None
        r.num_computed_tokens += 1
        bm.cache_computed_blocks(r)
    assert len(r.block_hashes) == 3  # the block of outputs is hashed once computed ...
    assert bm.blocks[2].block_hash == r.block_hashes[2]
    r.append_output_token(52)  # ... and token 12 opens block 3
    assert bm.allocate_slots(r, 1) == [0, 1, 2, 3]
    assert bm.blocks[3].block_hash is None


def test_hash_chain_is_stable_and_chained() -> None:
    bm = BlockManager(8, BS)
    r = make_request("r", [1, 2, 3, 4, 5, 6, 7, 8, 9], image(5, 2, "img"))
    bm.update_block_hashes(r)
    h0 = hash_block(None, [1, 2, 3, 4], ())
    h1 = hash_block(h0, [5, 6, 7, 8], (("img", 1),))  # the image starts at token 1 of block 1
    assert r.block_hashes == [h0, h1] and len(h0) == 32
    assert hash_block(None, [1, 2, 3, 4]) == h0  # deterministic, not Python's salted hash()
    assert hash_block(h1, [1, 2, 3, 4]) != h0  # the parent matters
    assert hash_block(h0, [5, 6, 7, 8]) != h1  # the image matters ...
    assert hash_block(h0, [5, 6, 7, 8], (("img", 0),)) != h1  # ... and where it sits


def test_free_returns_tail_blocks_first_and_keeps_hashes() -> None:
    bm = BlockManager(8, BS)
    r1, r2 = make_request("r1", list(range(10))), make_request("r2", list(range(100, 108)))
    compute(bm, r1)
    compute(bm, r2)
    hashes = [b.block_hash for b in bm.blocks]
    bm.free(r1)
    assert bm.free_block_ids() == [5, 6, 7, 2, 1, 0]
    bm.free(r2)
    assert bm.free_block_ids() == [5, 6, 7, 2, 1, 0, 4, 3]
    assert refs(bm) == [0] * 8 and bm.usage() == 0.0
    assert [b.block_hash for b in bm.blocks] == hashes  # still revivable
    bm.free(r2)  # a second free is a no-op
    assert bm.num_free_blocks == 8


def test_lru_eviction_hands_out_the_least_recently_freed_block_and_drops_its_hash() -> None:
    bm = BlockManager(6, BS)
    r1 = make_request("r1", list(range(12)))
    compute(bm, r1)  # [0, 1, 2], all three hashed
    bm.free(r1)  # free queue [3, 4, 5, 2, 1, 0]
    r2 = make_request("r2", list(range(100, 116)))
    assert compute(bm, r2) == [3, 4, 5, 2]  # evicts r1's tail block first
    assert bm.cached_block_id(r1.block_hashes[2]) is None
    assert bm.cached_block_id(r1.block_hashes[1]) == 1  # the head survives
    assert bm.cached_block_id(r1.block_hashes[0]) == 0
    r3 = make_request("r3", list(range(12)))
    assert bm.get_computed_blocks(r3) == ([0, 1], 8)
    assert bm.free_block_ids() == [1, 0]


def test_prefix_hit_revives_cached_free_blocks() -> None:
    bm = BlockManager(8, BS)
    r1 = make_request("r1", list(range(10)))
    compute(bm, r1)
    bm.free(r1)  # free queue [3, 4, 5, 6, 7, 2, 1, 0]
    r2 = make_request("r2", [*range(8), 90, 91, 92, 93])
    computed, num_hit = bm.get_computed_blocks(r2)
    assert (computed, num_hit) == ([0, 1], 8)
    assert refs(bm)[:2] == [0, 0]  # a lookup takes no references
    assert bm.allocate_slots(r2, 4, computed) == [0, 1, 3]
    assert refs(bm) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert bm.free_block_ids() == [4, 5, 6, 7, 2]
    # Stats count admissions: r1 (10 tokens, no hit), r2 (12 tokens, 8 hit).
    assert bm.prefix_cache_queries == 22 and bm.prefix_cache_hits == 8
    assert bm.stats.hit_rate == pytest.approx(8 / 22)


def test_prefix_hit_on_blocks_another_request_holds_shares_them() -> None:
    bm = BlockManager(8, BS)
    r1, r2 = make_request("r1", list(range(9))), make_request("r2", list(range(9)))
    compute(bm, r1)
    assert compute(bm, r2, hit=True) == [0, 1, 3]
    assert refs(bm)[:4] == [2, 2, 1, 1]
    bm.free(r1)
    assert refs(bm)[:4] == [1, 1, 0, 1] and bm.free_block_ids() == [4, 5, 6, 7, 2]


@pytest.mark.parametrize(("num_tokens", "num_hit_blocks"), [(7, 1), (8, 1), (9, 2), (12, 2)])
def test_hits_never_cover_the_last_token(num_tokens: int, num_hit_blocks: int) -> None:
    bm = BlockManager(8, BS)
    compute(bm, make_request("r1", list(range(12))))
    computed, num_hit = bm.get_computed_blocks(make_request("r2", list(range(num_tokens))))
    assert computed == [0, 1, 2][:num_hit_blocks] and num_hit == num_hit_blocks * BS


def test_identical_blocks_computed_twice_keep_one_cached_copy() -> None:
    bm = BlockManager(8, BS)
    r1, r2 = make_request("r1", list(range(8))), make_request("r2", list(range(8)))
    compute(bm, r1)
    assert compute(bm, r2, hit=True) == [0, 2]  # the hit is capped at one block
    assert bm.blocks[2].block_hash is None  # block 1 already holds that KV
    assert bm.cached_block_id(r2.block_hashes[1]) == 1
    bm.free(r1)
    bm.free(r2)
    assert sorted(bm.free_block_ids()) == list(range(8))


def test_same_tokens_and_same_image_share_every_block() -> None:
    bm = BlockManager(8, BS)
    tokens = [1, 2, 3, 4, 5, 9, 9, 9, 9, 6, 7, 8, 10]  # image tokens 5..8
    compute(bm, make_request("r1", tokens, image(5, 4, "cat")))
    hit = bm.get_computed_blocks(make_request("r2", tokens, image(5, 4, "cat")))
    assert hit == ([0, 1, 2], 12)


@pytest.mark.parametrize(("offset", "num_shared"), [(5, 1), (4, 1), (8, 2), (1, 0)])
def test_same_tokens_with_another_image_share_only_blocks_before_it(offset: int,
                                                                   num_shared: int) -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(13))
    compute(bm, make_request("r1", tokens, image(offset, 3, "cat")))
    computed, num_hit = bm.get_computed_blocks(make_request("r2", tokens, image(offset, 3, "dog")))
    assert computed == [0, 1, 2][:num_shared] and num_hit == num_shared * BS
    # No image at all is just as different.
    computed, _ = bm.get_computed_blocks(make_request("r3", tokens))
    assert computed == [0, 1, 2][:num_shared]


def test_two_images_in_swapped_order_do_not_share() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(9))
    two = (MMSpan(1, 1, "a", 0), MMSpan(2, 1, "b", 1))
    swapped = (MMSpan(1, 1, "b", 0), MMSpan(2, 1, "a", 1))
    compute(bm, make_request("r1", tokens, two))
    assert bm.get_computed_blocks(make_request("r2", tokens, swapped)) == ([], 0)
    assert bm.get_computed_blocks(make_request("r3", tokens, two)) == ([0, 1], 8)


def test_same_image_at_another_offset_does_not_share_its_blocks() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(13))
    compute(bm, make_request("r1", tokens, image(5, 2, "cat")))
    assert bm.get_computed_blocks(make_request("r2", tokens, image(4, 2, "cat"))) == ([0], 4)
    assert bm.get_computed_blocks(make_request("r3", tokens, image(5, 2, "cat"))) == ([0, 1, 2],
                                                                                      12)


def test_allocate_returns_none_and_changes_nothing_when_out_of_blocks() -> None:
    bm = BlockManager(4, BS)
    r1 = make_request("r1", list(range(9)))
    compute(bm, r1)  # [0, 1, 2]
    bm.free(r1)  # free queue [3, 2, 1, 0]; 0 and 1 are cached
    holder = make_request("h", list(range(100, 104)))
    compute(bm, holder)  # takes 3
    r2 = make_request("r2", [*range(8), *range(50, 58)])  # 16 tokens: 2 hit + 2 new blocks
    computed, _ = bm.get_computed_blocks(r2)
    assert computed == [0, 1]
    before = snapshot(bm)
    # Three blocks are free, but two of them are the hit: one left for two new blocks.
    assert bm.allocate_slots(r2, 8, computed) is None
    assert bm.allocate_slots(make_request("r3", list(range(200, 216))), 16) is None
    assert snapshot(bm) == before
    assert bm.allocate_slots(r2, 4, computed) == [0, 1, 2]


def test_blocks_are_cached_only_once_computed() -> None:
    bm = BlockManager(8, BS)
    r = make_request("r", list(range(12)))
    assert bm.allocate_slots(r, 12) == [0, 1, 2]
    twin = make_request("twin", list(range(13)))
    assert bm.get_computed_blocks(twin) == ([], 0)  # nothing to hit before the forward ran
    r.num_computed_tokens = 6  # a chunk of 6 ran
    bm.cache_computed_blocks(r)
    assert bm.get_computed_blocks(twin) == ([0], 4)
    bm.cache_computed_blocks(r, 12)
    assert bm.get_computed_blocks(twin) == ([0, 1, 2], 12)


def test_free_caches_the_computed_blocks_only() -> None:
    bm = BlockManager(8, BS)
    r = make_request("r", list(range(12)))
    bm.allocate_slots(r, 12)
    r.num_computed_tokens = 12
    bm.free(r, num_computed_tokens=5)  # the step computing tokens 5.. failed
    assert [b.block_hash is not None for b in bm.blocks[:3]] == [True, False, False]
    assert bm.get_computed_blocks(make_request("r2", list(range(12)))) == ([0], 4)
    r3 = make_request("r3", list(range(100, 112)))
    bm.allocate_slots(r3, 12)
    r3.num_computed_tokens = 12
    bm.free(r3)  # by default everything computed is cached
    assert bm.get_computed_blocks(make_request("r4", list(range(100, 113)))) == ([3, 4, 5], 12)


def test_reset_prefix_cache() -> None:
    bm = BlockManager(8, BS)
    r = make_request("r", list(range(9)))
    compute(bm, r)
    before = snapshot(bm)
    assert bm.reset_prefix_cache() is False  # blocks are held
    assert snapshot(bm) == before
    bm.free(r)
    assert bm.reset_prefix_cache() is True
    assert all(b.block_hash is None for b in bm.blocks) and not bm._cached
    assert bm.get_computed_blocks(make_request("r2", list(range(9)))) == ([], 0)


def test_prefix_caching_off() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    r1 = make_request("r1", list(range(9)))
    compute(bm, r1)
    r2 = make_request("r2", list(range(9)))
    assert bm.get_computed_blocks(r2) == ([], 0)
    assert all(b.block_hash is None for b in bm.blocks)
    assert r1.block_hashes == [] and bm.prefix_cache_queries == 0
    assert compute(bm, r2) == [3, 4, 5]


def test_computed_blocks_only_on_first_allocation() -> None:
    bm = BlockManager(8, BS)
    r = make_request("r", list(range(9)))
    compute(bm, r)
    with pytest.raises(ValueError, match="computed blocks"):
        bm.allocate_slots(r, 1, [0])
