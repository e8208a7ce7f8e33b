"""3-D M-RoPE positions: the protocol's worked example, transformers' `get_rope_index` on random
prompts (hypothesis), decode continuation and the errors for grids that do not fit the prompt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.errors import PromptError
from glmv.multimodal.rope_index import (
    decode_positions,
    mrope_positions,
    token_types,
    vision_positions,
)

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

# Ids of the tiny GLM-4.1V checkpoint (read from its config in `ids` below, checked there).
IMAGE, BEGIN_IMAGE, END_IMAGE, BEGIN_VIDEO, END_VIDEO = 1550, 1546, 1547, 1548, 1549
TEXT_IDS = st.integers(min_value=0, max_value=1500)  # ordinary vocabulary, no special token
MERGE = 2


def ours(ids: list[int], image_grids: list[Any], video_grids: list[Any]) -> tuple[Any, int]:
    return mrope_positions(
        ids, image_grids, video_grids, image_token_id=IMAGE, video_start_id=BEGIN_VIDEO,
        video_end_id=END_VIDEO, spatial_merge_size=MERGE,
    )


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoint: Callable[..., Path]) -> dict[str, Any]:
    """model_type -> transformers `Glm4vModel` / `Glm4vMoeModel` (owner of `get_rope_index`)."""
    models = {}
    for variant in ("glm-4.1v-thinking", "glm-4.5v"):
        ckpt = tiny_checkpoint(variant)
        model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt,
                                                                         dtype=torch.float32)
        config = model.config
        if variant == "glm-4.1v-thinking":
            assert (config.image_token_id, config.video_start_token_id,
                    config.video_end_token_id) == (IMAGE, BEGIN_VIDEO, END_VIDEO)
            assert config.image_start_token_id == BEGIN_IMAGE
        models[config.model_type] = model.model
    return models


def hf_rope(model: Any, ids: list[int], types: list[int], image_grids: list[Any],
            video_grids: list[Any]) -> tuple[torch.Tensor, int]:
    positions, delta = model.get_rope_index(
        torch.tensor([ids]), torch.tensor([types]),
        torch.tensor(image_grids) if image_grids else None,
        torch.tensor(video_grids) if video_grids else None,
    )
    return positions[:, 0], int(delta.item())


# ------------------------------------------------------------------ protocol 6.1 worked example


def test_protocol_worked_example() -> None:
    # [gMASK] <sop> <|user|> \n <|begin_of_image|> + image grid (1, 4, 6) + 4 text tokens
    ids = [1538, 1540, 1543, 198, BEGIN_IMAGE] + [IMAGE] * 6 + [END_IMAGE, 10, 11, 12]
    positions, delta = ours(ids, [(1, 4, 6)], [])
    assert positions.dtype == torch.long
    assert positions.tolist() == [
        [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 8, 9, 10, 11],
        [0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 8, 9, 10, 11],
        [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11],
    ]
    assert delta == -3
    # The first generated token (index 15) is at position 12 on every axis.
    assert decode_positions(15, 3, delta).tolist() == [[12, 13, 14]] * 3


def test_worked_example_matches_transformers(hf_models: dict[str, Any]) -> None:
    ids = [1538, 1540, 1543, 198, BEGIN_IMAGE] + [IMAGE] * 6 + [END_IMAGE, 10, 11, 12]
    types = [0] * 5 + [1] * 6 + [0] * 4
    for model in hf_models.values():
        expected, expected_delta = hf_rope(model, ids, types, [[1, 4, 6]], [])
        positions, delta = ours(ids, [(1, 4, 6)], [])
        assert torch.equal(positions, expected)
        assert delta == expected_delta == -3


def test_vision_positions_row_major() -> None:
    # grid 4 x 6 patches, merge 2 -> 2 x 3 tokens: t constant, h = row, w = column.
    assert vision_positions(7, 4, 6, 2).tolist() == [
        [7, 7, 7, 7, 7, 7], [7, 7, 7, 8, 8, 8], [7, 8, 9, 7, 8, 9],
    ]


def test_text_only_positions_are_plain_ranges() -> None:
    positions, delta = ours([5, 6, 7, 8], [], [])
    assert positions.tolist() == [[0, 1, 2, 3]] * 3
    assert delta == 0
    empty, empty_delta = ours([], [], [])
    assert empty.shape == (3, 0) and empty_delta == 0


def test_video_frame_pairs_each_restart_time() -> None:
    # A video of 2 frame pairs (grid 2 x 4 x 4 -> 4 tokens per pair), timestamp tokens between.
    ids = ([1, BEGIN_VIDEO, BEGIN_IMAGE] + [IMAGE] * 4 + [END_IMAGE, 15, BEGIN_IMAGE]
           + [IMAGE] * 4 + [END_IMAGE, 16, END_VIDEO, 2])
    positions, delta = ours(ids, [], [(2, 4, 4)])
    first = positions[:, 3:7].tolist()
    assert first == [[3, 3, 3, 3], [3, 3, 4, 4], [3, 4, 3, 4]]
    # after the first pair: s = 3 + 2 = 5 -> <|end_of_image|> 5, "0" 6, <|begin_of_image|> 7
    assert positions[:, 7:10].tolist() == [[5, 6, 7]] * 3
    assert positions[:, 10:14].tolist() == [[8, 8, 8, 8], [8, 8, 9, 9], [8, 9, 8, 9]]
    assert positions[:, -1].tolist() == [13] * 3
    assert delta == 14 - len(ids)


def test_token_types() -> None:
    ids = torch.tensor([IMAGE, 3, BEGIN_VIDEO, BEGIN_IMAGE, IMAGE, IMAGE, END_IMAGE, END_VIDEO,
                        IMAGE, BEGIN_VIDEO, IMAGE])
    assert token_types(ids, IMAGE, BEGIN_VIDEO, END_VIDEO).tolist() == [
        1, 0, 0, 0, 2, 2, 0, 0, 1, 0, 2,
    ]


# ------------------------------------------------------------------ random prompts vs transformers


@st.composite
def prompts(draw: st.DrawFn) -> tuple[list[int], list[int], list[Any], list[Any]]:
    """(ids, mm_token_type_ids, image grids, video grids) of a random GLM-V-shaped prompt."""
    ids: list[int] = draw(st.lists(TEXT_IDS, min_size=0, max_size=4))
    types = [0] * len(ids)
    image_grids: list[Any] = []
    video_grids: list[Any] = []
    even = st.integers(min_value=1, max_value=5).map(lambda n: 2 * n)
    for kind in draw(st.lists(st.sampled_from(["text", "image", "video"]), min_size=1,
                              max_size=6)):
        if kind == "text":
            run = draw(st.lists(TEXT_IDS, min_size=1, max_size=5))
            ids += run
            types += [0] * len(run)
            continue
        gh, gw = draw(even), draw(even)
        tokens = gh * gw // MERGE**2
        if kind == "image":
            image_grids.append([1, gh, gw])
            ids += [BEGIN_IMAGE] + [IMAGE] * tokens + [END_IMAGE]
            types += [0] + [1] * tokens + [0]
            continue
        t = draw(st.integers(min_value=1, max_value=3))
        video_grids.append([t, gh, gw])
        ids.append(BEGIN_VIDEO)
        types.append(0)
        for _ in range(t):
            stamp = draw(st.lists(TEXT_IDS, min_size=1, max_size=3))  # timestamp text
            ids += [BEGIN_IMAGE] + [IMAGE] * tokens + [END_IMAGE] + stamp
            types += [0] + [2] * tokens + [0] * (1 + len(stamp))
        ids.append(END_VIDEO)
        types.append(0)
    return ids, types, image_grids, video_grids


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts(), model_type=st.sampled_from(["glm4v", "glm4v_moe"]))
def test_random_prompts_match_transformers(
    hf_models: dict[str, Any], prompt: tuple[list[int], list[int], list[Any], list[Any]],
    model_type: str,
) -> None:
    ids, types, image_grids, video_grids = prompt
    assert token_types(torch.tensor(ids), IMAGE, BEGIN_VIDEO, END_VIDEO).tolist() == types
    expected, expected_delta = hf_rope(hf_models[model_type], ids, types, image_grids,
                                       video_grids)
    positions, delta = ours(ids, [tuple(g) for g in image_grids],
                            [tuple(g) for g in video_grids])
    assert positions.shape == (3, len(ids))
    assert torch.equal(positions, expected)
    assert delta == expected_delta
    # Decoding continues right after the largest prompt position, on all three axes.
    follow = decode_positions(len(ids), 2, delta)
    assert follow[:, 0].tolist() == [int(positions.max()) + 1] * 3
    assert follow[:, 1].tolist() == [int(positions.max()) + 2] * 3


def test_decode_positions() -> None:
    assert decode_positions(10, 3, -4).tolist() == [[6, 7, 8]] * 3
    assert decode_positions(0, 0, 5).shape == (3, 0)


# ------------------------------------------------------------------ errors


ONE_IMAGE = [1, BEGIN_IMAGE] + [IMAGE] * 4 + [END_IMAGE]
TWO_IMAGES = ONE_IMAGE + ONE_IMAGE


def test_more_grids_than_runs() -> None:
    with pytest.raises(PromptError, match="more images were given than the prompt has"):
        ours(ONE_IMAGE, [(1, 4, 4), (1, 4, 4)], [])
    with pytest.raises(PromptError, match="more video frames were given"):
        ours(ONE_IMAGE, [(1, 4, 4)], [(1, 4, 4)])


def test_fewer_grids_than_runs() -> None:
    with pytest.raises(PromptError, match="more image placeholder runs than images"):
        ours(TWO_IMAGES, [(1, 4, 4)], [])
    video = [BEGIN_VIDEO, BEGIN_IMAGE] + [IMAGE] * 4 + [END_IMAGE, 3, BEGIN_IMAGE] + [
        IMAGE] * 4 + [END_IMAGE, 4, END_VIDEO]
    # a grid with t = 1 covers one frame pair, the prompt has two
    with pytest.raises(PromptError, match="more video frame placeholder runs than video frames"):
        ours(video, [], [(1, 4, 4)])


def test_run_length_must_match_grid() -> None:
    with pytest.raises(PromptError, match=r"image run of 4 placeholders does not match grid "
                                          r"4x6 \(6 tokens\)"):
        ours(ONE_IMAGE, [(1, 4, 6)], [])
