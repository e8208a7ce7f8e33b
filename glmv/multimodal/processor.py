"""Prompt assembly: messages or text + media -> token ids, preprocessed media, 3-D positions.

    messages --normalize--> count items (limit_per_prompt) --documents -> page images-->
             chat template --tokenize--> ids with one <|image|> / <|video|> each
    media    --fetch (media.py, fetch.py) / sniff / decode--> preprocess (image.py / video.py)
    expand:  <|image|>  -> <|image|> x n
             <|video|>  -> for each frame pair: <|begin_of_image|> <|image|> x n <|end_of_image|> ts
    positions [3, L] + decode delta (rope_index.py)

Equal to transformers' processor on the same prompt and media: the expanded prompt tokenizes the
same because every expansion boundary is a special token, except the end of a video's last
timestamp, which is tokenized together with any text that follows it directly.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch

from glmv.chat_template import normalize_messages
from glmv.config import ModelConfig
from glmv.errors import ChatTemplateError, ImageError, MediaError, PromptError, TokenizerError
from glmv.multimodal.document import (
    DOCUMENT_PART_TYPES,
    DocumentLimits,
    document_pages,
    document_source,
)
from glmv.multimodal.hashing import hash_pixels
from glmv.multimodal.image import (
    ProcessedImage,
    image_num_tokens,
    image_pixel_bounds,
    load_image,
    process_image,
)
from glmv.multimodal.media import (
    MediaPolicy,
    decode_base64,
    describe_source,
    expect_file_format,
    expect_format,
    fetch_bytes,
    local_file,
    source_scheme,
)
from glmv.multimodal.processor_config import (
    ImageProcessorConfig,
    VideoProcessorConfig,
    load_processor_configs,
)
from glmv.multimodal.rope_index import mrope_positions
from glmv.multimodal.video import (
    DecodedVideo,
    ProcessedVideo,
    VideoChecks,
    decode_video,
    process_video,
    timestamp_text,
)
from glmv.tokenizer import Tokenizer

ImageInput = PIL.Image.Image | np.ndarray | bytes | str | Path
VideoInput = DecodedVideo | bytes | str | Path


@dataclass
class MultiModalItem:
    """One image or video of a prompt: its pixels and the prompt tokens it fills."""

    modality: Literal["image", "video"]
    pixel_values: torch.Tensor  # [num_patches, patch_dim] float32
    grid_thw: tuple[int, int, int]  # patches (t, h, w); videos: t = frame pairs
    offset: int  # index of this item's first <|image|> token in the prompt
    length: int  # tokens from the first to the last <|image|> of the item, inclusive
    num_embeds: int  # <|image|> tokens the vision tower fills (= length for an image)
    content_hash: str  # hash of the pixels, for caching
    original_size: tuple[int, int] | None  # (height, width) of a source image; None for video
    timestamps: list[float] = field(default_factory=list)  # video: seconds per frame pair


@dataclass
class ProcessedPrompt:
    """Everything the engine needs about one prompt."""

    prompt: str | None  # rendered text before expansion (None when given as token ids)
    token_ids: list[int]  # expanded prompt
    mm_items: list[MultiModalItem]  # in prompt order
    positions: torch.Tensor  # [3, len(token_ids)] int64
    rope_delta: int  # decode position = token index + rope_delta

    @property
    def num_image_tokens(self) -> int:
        return sum(i.num_embeds for i in self.mm_items if i.modality == "image")

    @property
    def num_video_tokens(self) -> int:
        return sum(i.num_embeds for i in self.mm_items if i.modality == "video")


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """PromptError naming the first id that is not an integer in 0..vocab_size - 1."""
    bad = next((t for t in ids if not (isinstance(t, numbers.Integral) and 0 <= t < vocab_size)),
               None)
    if bad is not None:
        raise PromptError(f"prompt token id {bad!r} is outside the vocabulary "
                          f"(0..{vocab_size - 1})")


#: Variables the renderer sets itself, which chat_template_kwargs may not name.
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                                       "chat_template_source", "source"})


class MultiModalProcessor:
    """The processor of one checkpoint: tokenizer, chat template, image and video settings."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer,
                 image_config: ImageProcessorConfig, video_config: VideoProcessorConfig,
                 media_policy: MediaPolicy | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.video_config = video_config
        self.media_policy = media_policy or MediaPolicy()
        #: Tokens a prompt may have at most: the engine sets its max_model_len here (None: the
        #: model's max_position_embeddings). Longer texts, and images that alone fill it, are
        #: refused before tokenizing or decoding.
        self.max_prompt_tokens: int | None = None
        sp = tokenizer.special
        if (sp.image, sp.video) != (config.image_token_id, config.video_token_id):
            raise TokenizerError(f"tokenizer ids of <|image|>/<|video|> ({sp.image}, {sp.video}) "
                              f"differ from config.json ({config.image_token_id}, "
                              f"{config.video_token_id})")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: ModelConfig | None = None,
                        tokenizer: Tokenizer | None = None,
                        media_policy: MediaPolicy | None = None) -> MultiModalProcessor:
        config = config or ModelConfig.from_pretrained(model_dir)
        tokenizer = tokenizer or Tokenizer.from_pretrained(model_dir)
        image_config, video_config = load_processor_configs(model_dir)
        return cls(config, tokenizer, image_config, video_config, media_policy)

    @property
    def prompt_token_limit(self) -> int:
        return self.max_prompt_tokens or self.config.text.max_position_embeddings

    # ------------------------------------------------------------------ media

    def load_image(self, source: ImageInput,
                   pixel_bounds: tuple[int, int] | None = None) -> PIL.Image.Image | np.ndarray:
        """Decode an image under the media policy: format sniffed from the bytes, pixel count
        and visual tokens checked from the header before decoding (PIL images and arrays pass
        through)."""
        if isinstance(source, (PIL.Image.Image, np.ndarray)):
            return source
        data = source if isinstance(source, bytes) else fetch_bytes(str(source),
                                                                    self.media_policy)

        def check_tokens(height: int, width: int) -> None:
            # An image that alone cannot fit the context is refused before it is decoded (a
            # 50-megapixel image costs ~0.5 GB and a second to decode).
            limit = self.prompt_token_limit
            tokens = image_num_tokens(height, width, self.image_config, pixel_bounds)
            if tokens >= limit:
                raise PromptError(f"the image ({width}x{height}) alone fills {tokens:,} tokens, "
                                  f"more than the model's context of {limit:,} (max_model_len) "
                                  "holds; send it smaller or with \"detail\": \"low\"")

        with _named(source):
            fmt = expect_format(data, "image")
            return load_image(data, max_pixels=self.media_policy.max_image_pixels,
                              formats=(fmt.pil_format,) if fmt.pil_format else None,
                              check_size=check_tokens)

    def load_video(self, source: VideoInput, fps: float | None = None) -> DecodedVideo:
        """Decode the sampled frames of a video under the media policy (format sniffed, length
        and frame count checked from the container before decoding)."""
        if isinstance(source, DecodedVideo):
            return source
        policy = self.media_policy
        # Local files are decoded in place: only the sampled frames are ever in memory.
        path = None if isinstance(source, bytes) else local_file(str(source), policy)
        data: bytes | Path
        if path is not None:
            data = path
        else:
            data = source if isinstance(source, bytes) else fetch_bytes(str(source), policy)
        with _named(source):
            fmt = (expect_file_format(data, "video") if isinstance(data, Path)
                   else expect_format(data, "video"))
            checks = VideoChecks(max_frames=policy.max_video_frames,
                                 max_seconds=policy.max_video_seconds,
                                 container_format=fmt.av_format)
            num_frames = policy.video_num_frames if fps is None else None
            return decode_video(data, self.video_config,
                                fps=policy.video_fps if fps is None else fps,
                                num_frames=num_frames, checks=checks)

    def load_document(self, part: Mapping[str, Any]) -> list[PIL.Image.Image]:
        """The page images of a file content part (PDF, PPT, PPTX), in page order."""
        source = document_source(part)
        policy = self.media_policy
        if source.url is not None:
            data = fetch_bytes(source.url, policy)
        else:
            assert source.base64_data is not None
            encoded = source.base64_data
            data = fetch_bytes(encoded, policy) if source_scheme(encoded) == "data" \
                else decode_base64(encoded, policy.max_bytes, "file_data")
        with _named(source.url or source.filename or "file_data"):
            fmt = expect_format(data, "document")
            config = self.image_config
            limits = DocumentLimits(
                max_pages=policy.max_document_pages,
                max_visual_tokens=policy.document_max_visual_tokens,
                max_page_pixels=min(policy.max_image_pixels,
                                    config.max_pixels // config.temporal_patch_size),
                office_timeout_s=policy.office_timeout_s)
            return document_pages(data, fmt, limits,
                                  lambda height, width: image_num_tokens(height, width, config))

    def preprocess_image(self, source: ImageInput,
                         pixel_bounds: tuple[int, int] | None = None) -> ProcessedImage:
        """`pixel_bounds`: this image's (min, max) resized pixels (see `image_pixel_bounds`)."""
        return process_image(self.load_image(source, pixel_bounds), self.image_config,
                             pixel_bounds)

    def preprocess_video(self, source: VideoInput, fps: float | None = None) -> ProcessedVideo:
        return process_video(self.load_video(source, fps), self.video_config)

    # ------------------------------------------------------------------ prompts

    def process(self, prompt: str, images: Sequence[ImageInput | ProcessedImage] = (),
                videos: Sequence[VideoInput | ProcessedVideo] = ()) -> ProcessedPrompt:
        """A rendered prompt with one <|image|> / <|video|> placeholder per item, in order."""
        self.media_policy.check_item_counts({"image": len(images), "video": len(videos)})
        return self._process(prompt, images, videos)

    def _process(self, prompt: str, images: Sequence[ImageInput | ProcessedImage],
                 videos: Sequence[VideoInput | ProcessedVideo],
                 image_bounds: Sequence[tuple[int, int] | None] = ()) -> ProcessedPrompt:
        bounds = list(image_bounds) or [None] * len(images)
        proc_images = [i if isinstance(i, ProcessedImage) else self.preprocess_image(i, b)
                       for i, b in zip(images, bounds, strict=True)]
        proc_videos = [v if isinstance(v, ProcessedVideo) else self.preprocess_video(v)
                       for v in videos]
        self._check_text_length(prompt)
        ids = self.tokenizer.encode(prompt)
        return self._expand(prompt, ids, proc_images, proc_videos)

    def _check_text_length(self, prompt: str) -> None:
        """Refuse text that cannot fit before tokenizing it: tokenizing holds the interpreter
        (10 MB took 16 s, with every other request of the server waiting), and no token covers
        more characters than the longest vocabulary entry."""
        limit = self.prompt_token_limit
        if len(prompt) > limit * self.tokenizer.max_token_chars:
            raise PromptError(f"the prompt is {len(prompt):,} characters, more than {limit} "
                              "tokens can hold (max_model_len)")

    def process_token_ids(self, token_ids: Sequence[int]) -> ProcessedPrompt:
        """A prompt given as token ids, without media."""
        ids = list(token_ids)
        # Checked here too, not only by the engine: the positions below need ids that fit int64.
        check_token_ids(ids, self.config.text.vocab_size)
        sp = self.tokenizer.special
        if sp.image in ids or sp.video in ids:
            raise PromptError("token-id prompts cannot carry images or videos; use chat messages")
        return self._expand(None, ids, [], [])

    def process_chat(self, messages: Sequence[Mapping[str, Any]], *,
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     add_generation_prompt: bool = True, chat_template: str | None = None,
                     chat_template_kwargs: Mapping[str, Any] | None = None,
                     assistant_prefill: str = "") -> ProcessedPrompt:
        """OpenAI-style messages (text, image_url / video_url / image / video / file parts).

        Before anything is fetched, the items per modality are counted against the policy's
        `limit_per_prompt` and every part's source and image options are checked. Then each
        document (file part) is replaced by its page images, in place, and the template renders.
        `chat_template_kwargs` become template variables, e.g. {"enable_thinking": False}.
        `assistant_prefill` is text the assistant turn starts with, appended after the rendered
        generation prompt (the server forces a tool call this way); it may not carry media.
        """
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(chat_template_kwargs or {}))
        if reserved:
            raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(reserved)}: "
                                    "the request itself sets them")
        normalized = normalize_messages(messages)
        if self.tokenizer.special.answer is not None:
            normalized = [strip_glm41v_history(m) for m in normalized]
        self.media_policy.check_item_counts(count_media(normalized))
        self._media_items(normalized)  # bad sources and options fail before any fetch
        normalized = self._expand_documents(normalized)
        images, image_bounds, videos = self._media_items(normalized)
        # The sandbox sees plain data only: media objects become inert placeholders there.
        prompt = self.tokenizer.render_chat(normalized, tools=tools,
                                            add_generation_prompt=add_generation_prompt,
                                            chat_template_source=chat_template,
                                            **dict(chat_template_kwargs or {}))
        return self._process(prompt + assistant_prefill, images, videos, image_bounds)

    def _media_items(self, messages: Sequence[Mapping[str, Any]],
                     ) -> tuple[list[Any], list[tuple[int, int] | None], list[Any]]:
        """(image sources, their pixel bounds, video sources) in template order."""
        image_parts, video_parts = collect_media_parts(messages)
        for part in (p for m in messages for p in _parts(m) if _part_kind(p) == "document"):
            document_source(part)
        images = [_media_source(p, "image") for p in image_parts]
        bounds = [image_pixel_bounds(self.image_config, *image_options(p)) for p in image_parts]
        return images, bounds, [_media_source(p, "video") for p in video_parts]

    def _expand_documents(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages with each file part replaced by image parts, one per page, in order."""
        out = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list) and any(_part_kind(p) == "document" for p in content):
                parts: list[Any] = []
                for part in content:
                    if _part_kind(part) == "document":
                        parts.extend({"type": "image", "image": page}
                                     for page in self.load_document(part))
                    else:
                        parts.append(part)
                message = {**message, "content": parts}
            out.append(message)
        return out

    def _expand(self, prompt: str | None, ids: list[int], images: list[ProcessedImage],
                videos: list[ProcessedVideo]) -> ProcessedPrompt:
        sp = self.tokenizer.special
        n_img, n_vid = ids.count(sp.image), ids.count(sp.video)
        if n_img != len(images) or n_vid != len(videos):
            raise PromptError(
                f"the prompt has {n_img} image and {n_vid} video placeholders but "
                f"{len(images)} images and {len(videos)} videos were given (a chat template "
                "drops media it does not support, e.g. images in tool results before GLM-4.6V)"
            )
        out: list[int] = []
        items: list[MultiModalItem] = []
        image_iter, video_iter = iter(images), iter(videos)
        index = 0
        while index < len(ids):
            token = ids[index]
            index += 1
            if token == sp.image:
                image = next(image_iter)
                items.append(self._item("image", image, len(out), image.num_tokens, [],
                                        image.original_size))
                out.extend([sp.image] * image.num_tokens)
            elif token == sp.video:
                video = next(video_iter)
                # Text right after <|video|> (no <|end_of_video|> between) joins the last
                # timestamp in transformers' expanded text, so they are tokenized together.
                tail_end = index
                while tail_end < len(ids) and ids[tail_end] not in self.tokenizer.special_ids:
                    tail_end += 1
                tail = self.tokenizer.decode(ids[index:tail_end]) if tail_end > index else ""
                index = tail_end
                tokens = self._video_tokens(video, tail)
                embeds = [i for i, t in enumerate(tokens) if t == sp.image]
                items.append(self._item("video", video, len(out) + embeds[0],
                                        embeds[-1] - embeds[0] + 1, video.timestamps, None))
                out.extend(tokens)
            else:
                out.append(token)
        positions, delta = mrope_positions(
            out, [i.grid_thw for i in items if i.modality == "image"],
            [i.grid_thw for i in items if i.modality == "video"],
            image_token_id=sp.image, video_start_id=sp.begin_of_video,
            video_end_id=sp.end_of_video, spatial_merge_size=self.config.vision.spatial_merge_size,
        )
        return ProcessedPrompt(prompt, out, items, positions, delta)

    def _timestamp(self, seconds: float) -> str:
        return timestamp_text(seconds, self.video_config.timestamp_style)

    def _video_tokens(self, video: ProcessedVideo, tail: str = "") -> list[int]:
        """The expansion of one <|video|>, plus `tail`: text that follows it directly."""
        sp = self.tokenizer.special
        tokens: list[int] = []
        for k, seconds in enumerate(video.timestamps):
            tokens.append(sp.begin_of_image)
            tokens.extend([sp.image] * video.tokens_per_frame)
            tokens.append(sp.end_of_image)
            last = k == len(video.timestamps) - 1
            tokens.extend(self.tokenizer.encode(self._timestamp(seconds) + (tail if last else "")))
        return tokens

    @staticmethod
    def _item(modality: Literal["image", "video"], media: ProcessedImage | ProcessedVideo,
              offset: int, length: int, timestamps: list[float],
              size: tuple[int, int] | None) -> MultiModalItem:
        return MultiModalItem(
            modality=modality, pixel_values=media.pixel_values, grid_thw=media.grid_thw,
            offset=offset, length=length, num_embeds=media.num_tokens,
            content_hash=media.content_hash or hash_pixels(media.pixel_values, media.grid_thw,
                                                           modality),
            original_size=size, timestamps=list(timestamps),
        )


_MEDIA_KEYS = {"image": ("image", "image_url", "image_pil", "url", "path"),
               "video": ("video", "video_url", "url", "path")}
_IMAGE_OPTIONS = ("detail", "min_pixels", "max_pixels")


@contextmanager
def _named(source: Any) -> Iterator[None]:
    """Decoding errors name the source first (data URLs shortened; raw bytes have no name)."""
    try:
        yield
    except MediaError as exc:
        if isinstance(source, (bytes, bytearray)):
            raise
        raise type(exc)(f"{describe_source(source)}: {exc}") from exc


def _media_source(part: Mapping[str, Any], modality: str) -> Any:
    for key in _MEDIA_KEYS[modality]:
        value = part.get(key)
        if isinstance(value, Mapping):
            value = value.get("url")
        if value is not None:
            return value
    raise MediaError(f"{modality} content part has no source (expected one of "
                     f"{', '.join(_MEDIA_KEYS[modality])})")


def image_options(part: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """(detail, min_pixels, max_pixels) of an image part: inside its `image_url` object or at the
    part's top level (ImageError if both places give different values)."""
    inner = part.get("image_url")
    inner = inner if isinstance(inner, Mapping) else {}
    values = []
    for key in _IMAGE_OPTIONS:
        nested, top = inner.get(key), part.get(key)
        if nested is not None and top is not None and nested != top:
            raise ImageError(f"image part gives {key} twice with different values "
                             f"({nested!r} in image_url, {top!r} in the part)")
        values.append(nested if nested is not None else top)
    return values[0], values[1], values[2]


def _media_kind(part: Any) -> str | None:
    """"image" / "video" for a media content part (as the templates tell), else None."""
    if not isinstance(part, Mapping):
        return None
    kind = part.get("type")
    if kind == "video" or (kind != "image" and "video" in part):
        return "video"
    if kind == "image" or "image" in part:
        return "image"
    return None


def _part_kind(part: Any) -> str | None:
    """"image" / "video" / "document" for a media content part, else None."""
    if isinstance(part, Mapping) and part.get("type") in DOCUMENT_PART_TYPES:
        return "document"
    return _media_kind(part)


def _parts(message: Mapping[str, Any]) -> list[Any]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def count_media(messages: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Items per modality ("image", "video", "document") in normalized messages."""
    counts = {"image": 0, "video": 0, "document": 0}
    for message in messages:
        for part in _parts(message):
            kind = _part_kind(part)
            if kind is not None:
                counts[kind] += 1
    return counts


def collect_media_parts(messages: Sequence[Mapping[str, Any]],
                        ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Image and video content parts in the order the templates render their placeholders."""
    images: list[Mapping[str, Any]] = []
    videos: list[Mapping[str, Any]] = []
    for message in messages:
        for part in _parts(message):
            kind = _media_kind(part)
            if kind is not None:
                (videos if kind == "video" else images).append(part)
    return images, videos


def collect_media(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Image and video sources in the order the templates render their placeholders."""
    image_parts, video_parts = collect_media_parts(messages)
    return ([_media_source(p, "image") for p in image_parts],
            [_media_source(p, "video") for p in video_parts])


_THINK_SPAN = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_glm41v_history(message: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.1V's template keeps assistant turns verbatim; the official demos send only the
    answer back: drop the <think> span and unwrap <answer> ... </answer>."""
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, str):
        return message
    text = _THINK_SPAN.sub("", content)
    text = text.replace("<answer>", "").replace("</answer>", "").strip()
    return {**message, "content": text}
