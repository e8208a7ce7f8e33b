"""MultiModalProcessor against transformers' GLM-V processors and models, for every variant.

For each case the same messages and media go to both sides: transformers renders the chat
template and runs its processor (PIL images; the full frame array + metadata for video, so both
run their own frame sampler), glmv runs `process_chat`. Token ids, pixel values, grids and the
3-D positions of `get_rope_index` must be equal. Then item bookkeeping, content hashes, errors
and the GLM-4.1V history rule.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from glmv.errors import ImageError, MediaError, PromptError, VideoError
from glmv.multimodal.hashing import hash_pixels
from glmv.multimodal.image import ProcessedImage, process_image
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import (
    MultiModalProcessor,
    ProcessedPrompt,
    collect_media,
    strip_glm41v_history,
)
from glmv.multimodal.rope_index import token_types
from glmv.multimodal.video import (
    DecodedVideo,
    ProcessedVideo,
    VideoMetadata,
    process_frames,
)
from tests.conftest import VARIANTS
from tests.multimodal.conftest import WriteVideo, encode_image, gradient_frame

transformers = pytest.importorskip("transformers", reason="transformers is the reference")
from transformers.video_utils import load_video  # noqa: E402

# transformers' processors call np.array() on tensors internally (numpy 2 copy= warning).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

GLM46_FAMILY = ("glm-4.6v", "glm-4.6v-flash")  # Glm46VProcessor: "x.y seconds", tool images
NUM_FRAMES, VIDEO_FPS = 30, 10.0  # the test clip: 3 s
# Timestamp text of the 3 s / 10 fps clip: Glm4vProcessor samples 2 fps (3 frame pairs),
# Glm46VProcessor 3 fps (9 frame pairs) and prints the float seconds.
EXPECTED_TIMESTAMPS = {
    "glm4v": ["0", "1", "2"],
    "glm46v": [f"{t} seconds" for t in
               ("0.0", "0.4", "0.7", "1.0", "1.4", "1.7", "2.0", "2.4", "2.7")],
}


def flavour(variant: str) -> str:
    return "glm46v" if variant in GLM46_FAMILY else "glm4v"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def procs(tiny_checkpoint: Callable[..., Path]) -> Callable[[str], MultiModalProcessor]:
    cache: dict[str, MultiModalProcessor] = {}

    def get(variant: str) -> MultiModalProcessor:
        if variant not in cache:
            cache[variant] = MultiModalProcessor.from_pretrained(tiny_checkpoint(variant))
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoint: Callable[..., Path]) -> Callable[[str], Any]:
    """variant -> transformers' inner model (owner of `get_rope_index`), built once."""
    cache: dict[str, Any] = {}

    def get(variant: str) -> Any:
        if variant not in cache:
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                tiny_checkpoint(variant), dtype=torch.float32)
            cache[variant] = model.model
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def pictures(photos: dict[str, np.ndarray]) -> dict[str, PIL.Image.Image]:
    """Small real photographs of different sizes and modes (token counts differ per picture)."""
    return {
        "astronaut": PIL.Image.fromarray(photos["astronaut"]).resize((120, 100)),
        "chelsea": PIL.Image.fromarray(photos["chelsea"]).resize((90, 140)),
        "camera": PIL.Image.fromarray(photos["camera"]).resize((100, 100)),  # mode "L"
        "coffee": PIL.Image.fromarray(photos["coffee"]).resize((150, 100)),
    }


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """The whole test clip, [30, 48, 64, 3] uint8, every frame different."""
    return np.stack([gradient_frame(i, 64, 48) for i in range(NUM_FRAMES)])


def clip_metadata() -> VideoMetadata:
    return VideoMetadata(NUM_FRAMES, VIDEO_FPS, NUM_FRAMES / VIDEO_FPS, 64, 48)


def hf_metadata() -> dict[str, Any]:
    return {"total_num_frames": NUM_FRAMES, "fps": VIDEO_FPS, "duration": NUM_FRAMES / VIDEO_FPS}


def data_url(image: PIL.Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_image(image, "PNG")).decode()


def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


# ------------------------------------------------------------------ cases


@dataclass
class Side:
    """Builds content parts for one side and records the media in prompt order."""

    ours: bool
    pictures: dict[str, PIL.Image.Image]
    video: ProcessedVideo | DecodedVideo | None = None
    images: list[PIL.Image.Image] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)

    def img(self, name: str) -> dict[str, Any]:
        picture = self.pictures[name]
        self.images.append(picture)
        self.modalities.append("image")
        if not self.ours:
            return {"type": "image", "image": picture}
        # glmv gets the pictures in the different forms a client may send.
        form = len(self.images) % 3
        if form == 1:
            return {"type": "image", "image": picture}
        if form == 2:
            return {"type": "image_url", "image_url": {"url": data_url(picture)}}
        return {"type": "image", "image": np.asarray(picture)}

    def vid(self) -> dict[str, Any]:
        self.modalities.append("video")
        return {"type": "video", "video": self.video if self.ours else "clip.mp4"}


def case_messages(name: str, s: Side) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, chat template kwargs) of a named case."""
    if name == "text":
        return [{"role": "user", "content": "Hello, who are you?"}], {}
    if name == "image":
        return [{"role": "user", "content": [s.img("astronaut"), text("What is this?")]}], {}
    if name == "images":
        return [{"role": "user", "content": [
            text("Compare"), s.img("chelsea"), text(" with "), s.img("camera"),
            s.img("astronaut"), text("which is a cat?")]}], {}
    if name == "video":
        return [{"role": "user", "content": [s.vid(), text("Describe.")]}], {}
    if name == "history":
        return [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [s.img("coffee"), text("Q1")]},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": [text("Q2"), s.img("chelsea")]},
        ], {}
    if name == "no_thinking":
        return [{"role": "user", "content": [s.img("camera"), text("q")]}], {
            "enable_thinking": False}
    if name == "tool_image":
        return [
            {"role": "user", "content": "Take a screenshot."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "screenshot", "arguments": {}}}]},
            {"role": "tool", "content": [text("Here is the screen:"), s.img("coffee")]},
        ], {}
    if name == "mixed":
        return [{"role": "user", "content": [
            s.img("astronaut"), s.vid(), text("Same scene?"), s.img("chelsea")]}], {}
    raise KeyError(name)


CASES = ("text", "image", "images", "video", "history", "no_thinking", "tool_image")
# (variant, case): images in tool results only render with the GLM-4.6V-family template.
PARITY_CASES = [(v, c) for v in VARIANTS for c in CASES
                if c != "tool_image" or v in GLM46_FAMILY]


@dataclass
class Pair:
    ours: ProcessedPrompt
    hf: Any  # transformers BatchFeature
    rendered: str
    modalities: list[str]


def run_both(variant: str, name: str, proc: MultiModalProcessor, hf_proc: Any,
             pictures: dict[str, PIL.Image.Image], frames: np.ndarray,
             video: ProcessedVideo | DecodedVideo | None = None) -> Pair:
    hf_side = Side(ours=False, pictures=pictures)
    messages, kwargs = case_messages(name, hf_side)
    rendered = hf_proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           **kwargs)
    media: dict[str, Any] = {}
    if hf_side.images:
        media["images"] = hf_side.images
    if "video" in hf_side.modalities:
        media.update(videos=[frames], video_metadata=[hf_metadata()], do_sample_frames=True)
    hf = hf_proc(text=[rendered], return_tensors="pt", **media)

    if video is None:
        video = process_frames(frames, clip_metadata(), proc.video_config, sample=True)
    our_side = Side(ours=True, pictures=pictures, video=video)
    messages, kwargs = case_messages(name, our_side)
    ours = proc.process_chat(messages, chat_template_kwargs=kwargs or None)
    assert ours.prompt == rendered
    return Pair(ours, hf, rendered, our_side.modalities)


def assert_pixels_match(pair: Pair) -> None:
    """Per item: grid equal to transformers' and pixel rows bit-identical to its slice."""
    for modality, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                           ("video", "pixel_values_videos", "video_grid_thw")):
        items = [i for i in pair.ours.mm_items if i.modality == modality]
        if not items:
            assert grid_key not in pair.hf
            continue
        grids = pair.hf[grid_key].tolist()
        assert [list(i.grid_thw) for i in items] == grids
        rows = torch.split(pair.hf[pixels_key], [t * h * w for t, h, w in grids])
        assert len(rows) == len(items)
        for item, expected in zip(items, rows, strict=True):
            assert item.pixel_values.dtype == torch.float32
            assert torch.equal(item.pixel_values, expected)


def assert_positions_match(pair: Pair, model: Any) -> None:
    hf = pair.hf
    expected, delta = model.get_rope_index(
        hf["input_ids"], hf["mm_token_type_ids"], hf.get("image_grid_thw"),
        hf.get("video_grid_thw"))
    assert pair.ours.positions.shape == (3, len(pair.ours.token_ids))
    assert torch.equal(pair.ours.positions, expected[:, 0])
    assert pair.ours.rope_delta == int(delta.item())


def assert_bookkeeping(result: ProcessedPrompt, proc: MultiModalProcessor,
                       modalities: list[str]) -> None:
    """Each item's span holds exactly its <|image|> tokens; items in prompt order."""
    sp = proc.tokenizer.special
    ids = result.token_ids
    assert [i.modality for i in result.mm_items] == modalities
    end = 0
    for item in result.mm_items:
        assert item.offset >= end  # in order, no overlap
        span = ids[item.offset:item.offset + item.length]
        t, h, w = item.grid_thw
        assert item.num_embeds == t * h * w // 4
        assert span[0] == span[-1] == sp.image
        assert span.count(sp.image) == item.num_embeds
        if item.modality == "image":
            assert item.length == item.num_embeds and t == 1
            assert (ids[item.offset - 1], ids[item.offset + item.length]) == (
                sp.begin_of_image, sp.end_of_image)
            assert item.original_size is not None and not item.timestamps
        else:
            assert ids[item.offset - 2:item.offset] == [sp.begin_of_video, sp.begin_of_image]
            assert span.count(sp.begin_of_image) == span.count(sp.end_of_image) == t - 1
            assert ids[item.offset + item.length] == sp.end_of_image
            assert len(item.timestamps) == t and item.original_size is None
        end = item.offset + item.length
    types = token_types(torch.tensor(ids), sp.image, sp.begin_of_video, sp.end_of_video)
    assert result.num_image_tokens == int((types == 1).sum())
    assert result.num_video_tokens == int((types == 2).sum())
    assert result.num_image_tokens + result.num_video_tokens == ids.count(sp.image)
    assert sp.video not in ids  # every <|video|> placeholder was expanded


# ------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize(("variant", "name"), PARITY_CASES)
def test_matches_transformers(procs: Any, hf_processor: Any, hf_models: Any,
                              pictures: dict[str, PIL.Image.Image], frames: np.ndarray,
                              variant: str, name: str) -> None:
    proc = procs(variant)
    pair = run_both(variant, name, proc, hf_processor(variant), pictures, frames)
    assert pair.ours.token_ids == pair.hf["input_ids"][0].tolist()
    assert_pixels_match(pair)
    assert_positions_match(pair, hf_models(variant))
    assert_bookkeeping(pair.ours, proc, pair.modalities)
    # mm_token_type_ids are what get_rope_index splits the prompt by.
    sp = proc.tokenizer.special
    types = token_types(torch.tensor(pair.ours.token_ids), sp.image, sp.begin_of_video,
                        sp.end_of_video)
    assert types.tolist() == pair.hf["mm_token_type_ids"][0].tolist()
    if name == "no_thinking" and variant != "glm-4.1v-thinking":
        assert pair.rendered.endswith("q/nothink<|assistant|>\n<think></think>\n")
    if name == "tool_image":
        assert ("<|observation|>\n<tool_response>\nHere is the screen:<|begin_of_image|>"
                "<|image|><|end_of_image|>\n</tool_response>") in pair.rendered


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_and_video_in_one_prompt(procs: Any, hf_processor: Any, hf_models: Any,
                                        pictures: dict[str, PIL.Image.Image],
                                        frames: np.ndarray, variant: str) -> None:
    # transformers' model refuses images and a video together, its processor does not.
    proc = procs(variant)
    pair = run_both(variant, "mixed", proc, hf_processor(variant), pictures, frames)
    assert pair.ours.token_ids == pair.hf["input_ids"][0].tolist()
    assert_pixels_match(pair)
    assert_bookkeeping(pair.ours, proc, ["image", "video", "image"])
    assert_positions_match(pair, hf_models(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_timestamps_in_prompt(procs: Any, hf_processor: Any,
                                    pictures: dict[str, PIL.Image.Image], frames: np.ndarray,
                                    variant: str) -> None:
    proc = procs(variant)
    pair = run_both(variant, "video", proc, hf_processor(variant), pictures, frames)
    decoded = proc.tokenizer.decode(pair.ours.token_ids)
    stamps = re.findall(r"<\|end_of_image\|>(.*?)(?=<\|begin_of_image\|>|<\|end_of_video\|>)",
                        decoded)
    assert stamps == EXPECTED_TIMESTAMPS[flavour(variant)]
    (video,) = pair.ours.mm_items
    assert video.grid_thw[0] == len(stamps)
    if flavour(variant) == "glm4v":
        assert video.timestamps == [0.0, 1.0, 2.0]
    else:
        assert all(re.fullmatch(r"\d+\.\d seconds", s) for s in stamps)
        assert video.timestamps[:3] == pytest.approx([0.0, 0.4, 0.7])


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoded_video_matches_processed(procs: Any, hf_processor: Any,
                                         pictures: dict[str, PIL.Image.Image],
                                         frames: np.ndarray, variant: str) -> None:
    # A DecodedVideo (frames already sampled) in the part instead of a ProcessedVideo.
    proc = procs(variant)
    processed = process_frames(frames, clip_metadata(), proc.video_config, sample=True)
    decoded = DecodedVideo(frames[processed.frame_indices], list(processed.frame_indices),
                           clip_metadata())
    pair = run_both(variant, "video", proc, hf_processor(variant), pictures, frames, decoded)
    assert pair.ours.token_ids == pair.hf["input_ids"][0].tolist()
    assert_pixels_match(pair)


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_file_end_to_end(procs: Any, hf_processor: Any, hf_models: Any,
                               write_video: WriteVideo, tmp_path: Path, variant: str) -> None:
    path = write_video("clip.mp4", num_frames=NUM_FRAMES, fps=int(VIDEO_FPS))
    base = procs(variant)
    proc = MultiModalProcessor(base.config, base.tokenizer, base.image_config, base.video_config,
                               MediaPolicy(allowed_local_paths=(str(tmp_path),)))
    ours = proc.process_chat([{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": str(path)}}, text("Describe.")]}])

    hf_proc = hf_processor(variant)
    all_frames, metadata = load_video(
        str(path), backend="pyav",
        sample_indices_fn=lambda metadata, **_: np.arange(metadata.total_num_frames))
    assert len(all_frames) == NUM_FRAMES
    rendered = hf_proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video", "video": str(path)}, text("Describe.")]}],
        tokenize=False, add_generation_prompt=True)
    hf = hf_proc(text=[rendered], videos=[all_frames], video_metadata=[metadata],
                 do_sample_frames=True, return_tensors="pt")
    assert ours.token_ids == hf["input_ids"][0].tolist()
    pair = Pair(ours, hf, rendered, ["video"])
    assert_pixels_match(pair)
    assert_positions_match(pair, hf_models(variant))
    assert_bookkeeping(ours, proc, ["video"])
    # The same file through a file:// URL and as raw bytes gives the same prompt.
    for source in (path.as_uri(), path.read_bytes()):
        again = proc.process_chat([{"role": "user", "content": [
            {"type": "video", "video": source}, text("Describe.")]}])
        assert again.token_ids == ours.token_ids
        assert again.mm_items[0].content_hash == ours.mm_items[0].content_hash


@pytest.mark.parametrize("variant", ["glm-4.1v-thinking", "glm-4.6v"])
def test_raw_prompt_video_followed_by_text(procs: Any, hf_processor: Any, frames: np.ndarray,
                                           variant: str) -> None:
    # Without <|end_of_video|> the last timestamp and the next text are one piece of text for
    # transformers' tokenizer ("2" + "5 cats" -> "25 cats").
    proc = procs(variant)
    video = process_frames(frames, clip_metadata(), proc.video_config, sample=True)
    for prompt in ("<|begin_of_video|><|video|>5 cats", "<|begin_of_video|><|video|>s<|user|>x",
                   "<|begin_of_video|><|video|>"):
        hf = hf_processor(variant)(text=[prompt], videos=[frames], video_metadata=[hf_metadata()],
                                   do_sample_frames=True)
        ours = proc.process(prompt, videos=[video])
        assert ours.token_ids == hf["input_ids"][0], prompt
        assert_bookkeeping(ours, proc, ["video"])


def test_process_with_processed_media(procs: Any, hf_processor: Any,
                                      pictures: dict[str, PIL.Image.Image],
                                      frames: np.ndarray) -> None:
    # `process` on a rendered prompt, media already preprocessed (ProcessedImage/Video).
    proc = procs("glm-4.5v")
    prompt = ("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
              "<|begin_of_video|><|video|><|end_of_video|>x<|assistant|>\n")
    image = proc.preprocess_image(pictures["coffee"])
    assert isinstance(image, ProcessedImage)
    video = process_frames(frames, clip_metadata(), proc.video_config, sample=True)
    ours = proc.process(prompt, images=[image], videos=[video])
    hf = hf_processor("glm-4.5v")(text=[prompt], images=[pictures["coffee"]], videos=[frames],
                                  video_metadata=[hf_metadata()], do_sample_frames=True)
    assert ours.token_ids == hf["input_ids"][0]
    assert ours.prompt == prompt
    assert ours.mm_items[0].pixel_values is image.pixel_values
    assert ours.mm_items[0].original_size == (100, 150)
    assert_bookkeeping(ours, proc, ["image", "video"])


def test_process_token_ids(procs: Any) -> None:
    proc = procs("glm-4.6v")
    ids = proc.tokenizer.encode("[gMASK]<sop><|user|>\nHello<|assistant|>\n")
    result = proc.process_token_ids(ids)
    assert result.prompt is None and result.mm_items == []
    assert result.token_ids == ids
    assert result.positions.tolist() == [list(range(len(ids)))] * 3
    assert result.rope_delta == 0


# ------------------------------------------------------------------ content hashes


def test_content_hash(procs: Any, pictures: dict[str, PIL.Image.Image], tmp_path: Path) -> None:
    base = procs("glm-4.6v")
    proc = MultiModalProcessor(base.config, base.tokenizer, base.image_config, base.video_config,
                               MediaPolicy(allowed_local_paths=(str(tmp_path),)))
    picture = pictures["chelsea"]
    png = encode_image(picture, "PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(png)
    forms: list[Any] = [picture, png, data_url(picture), str(path), path.as_uri(),
                        np.asarray(picture)]
    placeholder = "<|begin_of_image|><|image|><|end_of_image|>"
    result = proc.process(placeholder * len(forms), images=forms)
    hashes = {item.content_hash for item in result.mm_items}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 32

    others = [pictures["astronaut"], picture.resize((180, 280)), picture.transpose(
        PIL.Image.Transpose.FLIP_LEFT_RIGHT)]
    other = proc.process(placeholder * len(others), images=others)
    other_hashes = [item.content_hash for item in other.mm_items]
    assert len(set(other_hashes)) == len(others) and not hashes & set(other_hashes)
    # Same pixels through the chat path hash the same as through `process`.
    chat = proc.process_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": path.as_uri()}}]}])
    assert chat.mm_items[0].content_hash in hashes


def test_content_hash_of_video(procs: Any, frames: np.ndarray) -> None:
    proc = procs("glm-4.5v")
    video = process_frames(frames, clip_metadata(), proc.video_config, sample=True)
    prompt = "<|begin_of_video|><|video|><|end_of_video|>"
    first = proc.process(prompt * 2, videos=[video, video]).mm_items
    assert first[0].content_hash == first[1].content_hash
    shifted = process_frames(frames[::-1].copy(), clip_metadata(), proc.video_config,
                             sample=True)
    (other,) = proc.process(prompt, videos=[shifted]).mm_items
    assert other.content_hash != first[0].content_hash


def test_image_and_still_video_hash_differently(procs: Any,
                                                pictures: dict[str, PIL.Image.Image]) -> None:
    # Two identical frames make exactly the pixels of the image, but a video is another item.
    proc = procs("glm-4.6v")
    picture = pictures["coffee"]
    still = process_frames(np.stack([np.asarray(picture)] * 2), clip_metadata(),
                           proc.video_config, sample=False)
    result = proc.process("<|begin_of_image|><|image|><|end_of_image|>"
                          "<|begin_of_video|><|video|><|end_of_video|>",
                          images=[picture], videos=[still])
    image, video = result.mm_items
    assert torch.equal(image.pixel_values, video.pixel_values)
    assert image.grid_thw == video.grid_thw
    assert image.content_hash != video.content_hash


def test_content_hash_covers_the_normalisation(procs: Any,
                                               pictures: dict[str, PIL.Image.Image]) -> None:
    """The hash is taken of the uint8 patches before they are normalised: the normalisation's
    constants must count, and a media item made without a hash is hashed by its pixels."""
    proc = procs("glm-4.6v")
    picture = pictures["coffee"]
    config = proc.image_config
    first, again = process_image(picture, config), process_image(picture, config)
    assert first.content_hash == again.content_hash and len(first.content_hash) == 32
    shifted = process_image(picture, replace(config, image_mean=(0.5, 0.5, 0.5)))
    assert not torch.equal(shifted.pixel_values, first.pixel_values)
    assert shifted.content_hash != first.content_hash
    placeholder = "<|begin_of_image|><|image|><|end_of_image|>"
    (item,) = proc.process(placeholder, images=[first]).mm_items
    assert item.content_hash == first.content_hash
    (unhashed,) = proc.process(placeholder, images=[replace(first, content_hash="")]).mm_items
    assert unhashed.content_hash == hash_pixels(first.pixel_values, first.grid_thw, "image")


def test_hash_pixels() -> None:
    pixels = torch.arange(24 * 1176, dtype=torch.float32).reshape(24, 1176)
    digest = hash_pixels(pixels, (1, 4, 6), "image")
    assert digest == hash_pixels(pixels.clone(), (1, 4, 6), "image")
    # a strided view of the same values hashes like the contiguous tensor
    assert digest == hash_pixels(pixels.t().contiguous().t(), (1, 4, 6), "image")
    changed = pixels.clone()
    changed[23, 1175] += 1
    others = {hash_pixels(changed, (1, 4, 6), "image"), hash_pixels(pixels, (1, 6, 4), "image"),
              hash_pixels(pixels, (1, 4, 6), "video"), hash_pixels(pixels.double(), (1, 4, 6),
                                                                    "image")}
    assert len(others) == 4 and digest not in others


# ------------------------------------------------------------------ errors


def test_fewer_images_than_placeholders(procs: Any, pictures: dict[str, PIL.Image.Image]) -> None:
    proc = procs("glm-4.6v")
    two = "<|begin_of_image|><|image|><|end_of_image|>" * 2
    with pytest.raises(PromptError, match=r"2 image and 0 video placeholders but 1 images"):
        proc.process(two, images=[pictures["camera"]])
    with pytest.raises(PromptError, match=r"1 image and 0 video placeholders but 0 images and "
                                          r"1 videos"):
        proc.process("<|image|>", videos=[DecodedVideo(
            np.zeros((2, 56, 56, 3), np.uint8), [0, 1], VideoMetadata(2, 1.0, 2.0, 56, 56))])


def test_tool_images_dropped_by_the_glm45v_template(
        procs: Any, pictures: dict[str, PIL.Image.Image]) -> None:
    side = Side(ours=True, pictures=pictures)
    messages, _ = case_messages("tool_image", side)
    with pytest.raises(PromptError, match="template") as info:
        procs("glm-4.5v").process_chat(messages)
    assert "0 image" in str(info.value) and "1 images" in str(info.value)
    with pytest.raises(PromptError, match="template"):
        procs("glm-4.1v-thinking").process_chat(messages)


def test_token_ids_with_media_placeholders(procs: Any) -> None:
    proc = procs("glm-4.1v-thinking")
    sp = proc.tokenizer.special
    for placeholder in (sp.image, sp.video):
        with pytest.raises(PromptError, match="token-id prompts cannot carry images"):
            proc.process_token_ids([1, 2, placeholder, 3])


@pytest.mark.parametrize("part", [{"type": "image"}, {"type": "image_url", "image_url": {}},
                                  {"type": "image_url"}, {"type": "video_url", "video_url": {}}])
def test_media_part_without_source(procs: Any, part: dict[str, Any]) -> None:
    with pytest.raises(MediaError, match="content part has no source"):
        procs("glm-4.6v").process_chat([{"role": "user", "content": [part, text("hi")]}])


def test_unreadable_image_data_url(procs: Any) -> None:
    url = "data:image/png;base64," + base64.b64encode(b"certainly not a PNG").decode()
    with pytest.raises(ImageError, match="cannot decode image"):
        procs("glm-4.6v").process_chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}])


def test_unreadable_video_file(procs: Any, tmp_path: Path) -> None:
    base = procs("glm-4.6v")
    proc = MultiModalProcessor(base.config, base.tokenizer, base.image_config, base.video_config,
                               MediaPolicy(allowed_local_paths=(str(tmp_path),)))
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not really a video" * 10)
    with pytest.raises(VideoError, match="not a readable video"):
        proc.process_chat([{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": str(bad)}}]}])


def test_local_media_needs_an_allowed_folder(procs: Any, pictures: dict[str, PIL.Image.Image],
                                             tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(encode_image(pictures["chelsea"], "PNG"))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(path)}}]}]
    with pytest.raises(MediaError, match="outside the allowed media folders") as info:
        procs("glm-4.6v").process_chat(messages)  # default policy: no local files
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ chat history and media order


def test_glm41v_history_drops_reasoning(procs: Any) -> None:
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>R</think><answer>A</answer>"},
        {"role": "user", "content": "Q2"},
    ]
    result = procs("glm-4.1v-thinking").process_chat(messages)
    assert result.prompt == ("[gMASK]<sop><|user|>\nQ1<|assistant|>\nA<|user|>\nQ2"
                             "<|assistant|>\n")
    assert result.token_ids == procs("glm-4.1v-thinking").tokenizer.encode(result.prompt)


@pytest.mark.parametrize("variant", ["glm-4.5v", "glm-4.6v"])
def test_glm45v_template_handles_reasoning(procs: Any, pictures: dict[str, PIL.Image.Image],
                                           variant: str) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": pictures["camera"]},
                                     text("Q1")]},
        {"role": "assistant", "content": "<think>R1</think>A1"},
        {"role": "user", "content": "Q2"},
    ]
    result = procs(variant).process_chat(messages)
    # protocol 2.2 case (d): earlier reasoning stripped by the template itself
    assert result.prompt == ("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
                             "Q1<|assistant|>\n<think></think>\nA1<|user|>\nQ2<|assistant|>\n")


def test_strip_glm41v_history() -> None:
    msg = {"role": "assistant", "content": "<think>\nlong\nthought\n</think>\n<answer>A1</answer>"}
    assert strip_glm41v_history(msg) == {"role": "assistant", "content": "A1"}
    assert msg["content"].startswith("<think>")  # the caller's message is not changed
    for untouched in ({"role": "user", "content": "<think>x</think>"},
                      {"role": "assistant", "content": [text("<think>x</think>")]}):
        assert strip_glm41v_history(untouched) is untouched


def test_collect_media_order() -> None:
    image_a, image_b, video = object(), object(), object()
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "image", "image": image_a}, text("x"),
                                     {"type": "video_url", "video_url": {"url": "v.mp4"}}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "video", "video": video},
                                     {"type": "image_url", "image_url": "c.png"},
                                     {"image": image_b}]},
    ]
    from glmv.chat_template import normalize_messages

    images, videos = collect_media(normalize_messages(messages))
    assert images == [image_a, "b.png", "c.png", image_b]
    assert videos == ["v.mp4", video]


def test_processed_prompt_is_consistent_with_decode(procs: Any,
                                                    pictures: dict[str, PIL.Image.Image]) -> None:
    proc = procs("glm-4.6v-flash")
    result = proc.process_chat([{"role": "user", "content": [
        {"type": "image", "image": pictures["astronaut"]}, text("Hi")]}])
    (item,) = result.mm_items
    expanded = result.prompt.replace("<|image|>", "<|image|>" * item.num_embeds)  # type: ignore
    assert proc.tokenizer.decode(result.token_ids) == expanded
    assert item.original_size == (100, 120)
