"""Vision-encoder outputs kept by content hash, so a picture asked about again is not re-encoded.

Two layers:
- `EncoderCache`: an LRU of encoder outputs under a byte budget, shared by all requests (a new
  turn about the same image, another request with the same frames).
- `VisionInputs`: per request, the outputs of the items its prefill has reached but not yet
  passed; they stay here until the chunk covering the item's last token has run, whatever the
  LRU evicts, so a chunked prefill never encodes an item twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from glmv.multimodal.processor import MultiModalItem


class EncoderCache:
    """LRU map content hash -> encoder output [num_embeds, hidden], at most `max_bytes` in all.

    An output bigger than the whole budget is not kept. `hits`/`misses` count lookups.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= old.numel() * old.element_size()
        self._entries[key] = value
        self.num_bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.num_bytes = 0


#: Runs the vision tower over the pixels of several items at once: [P, patch_dim] -> rows.
EncodeFn = Callable[[torch.Tensor, list[tuple[int, int, int]]], torch.Tensor]


class VisionInputs:
    """Finds, encodes (batched) and slices the vision embeddings each prefill chunk needs."""

    def __init__(self, cache: EncoderCache, encode: EncodeFn, image_token_id: int) -> None:
        self.cache = cache
        self.encode = encode
        self.image_token_id = image_token_id
        self._held: dict[str, dict[int, torch.Tensor]] = {}  # request id -> item idx -> rows
        self.num_encoded_items = 0  # items that went through the encoder (cache misses)

    def release(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    def prepare(self, needs: Sequence[tuple[str, int, MultiModalItem]]) -> None:
        """Make the outputs of (request id, item idx, item) available, encoding the missing
        ones in one encoder call (an item shared by several requests is encoded once)."""
        missing: dict[str, MultiModalItem] = {}
        for request_id, idx, item in needs:
            held = self._held.setdefault(request_id, {})
            if idx in held:
                continue
            rows = self.cache.get(item.content_hash)
            if rows is not None:
                held[idx] = rows
            else:
                missing.setdefault(item.content_hash, item)
        if not missing:
            return
        items = list(missing.values())
        out = self.encode(torch.cat([i.pixel_values for i in items]), [i.grid_thw for i in items])
        self.num_encoded_items += len(items)
        by_hash = {}
        for item, rows in zip(items, out.split([i.num_embeds for i in items]), strict=True):
            # A split view would pin the whole batch's output in the cache: keep a copy.
            rows = rows.clone() if len(items) > 1 else rows
            self.cache.put(item.content_hash, rows)
            by_hash[item.content_hash] = rows
        for request_id, idx, item in needs:
            held = self._held[request_id]
            if idx not in held:
                held[idx] = by_hash[item.content_hash]

    def rows_for(self, request_id: str, token_ids: Sequence[int], items: Sequence[MultiModalItem],
                 start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeds [k, hidden], mask [end - start] bool) for prompt tokens [start, end), or None
        when the range holds no vision token. Items passed by `end` are released."""
        held = self._held.get(request_id, {})
        mask = torch.tensor([t == self.image_token_id for t in token_ids[start:end]],
                            dtype=torch.bool)
        parts = []
        for idx, item in enumerate(items):
            lo, hi = max(start, item.offset), min(end, item.offset + item.length)
            if lo >= hi:
                continue
            first = sum(1 for t in token_ids[item.offset:lo] if t == self.image_token_id)
            count = sum(1 for t in token_ids[lo:hi] if t == self.image_token_id)
            parts.append(held[idx][first:first + count])
            if end >= item.offset + item.length:
                held.pop(idx)
        if not parts:
            return None
        return torch.cat(parts), mask
