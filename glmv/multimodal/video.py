"""Video decoding, frame sampling and GLM-V video preprocessing, matching transformers 5.23.

    bytes / path --probe--> VideoMetadata --sampler--> frame indices --decode only those-->
    DecodedVideo uint8 [N, H, W, 3] --one smart_resize for the clip, bicubic, normalise-->
    patchify (pairs of frames) --> ProcessedVideo [gt*gh*gw, 3*2*14*14] + one timestamp per pair

Metadata equals transformers' `read_video_pyav`; the samplers copy `Glm4vVideoProcessor` and
`Glm46VVideoProcessor.sample_frames`; pixels equal `Glm4vVideoProcessor` on the sampled frames.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import av.container
import numpy as np
import torch

from glmv.errors import ImageError, MediaTooLargeError, VideoError
from glmv.multimodal.image import patchify_normalized, resize_frames, target_size
from glmv.multimodal.processor_config import VideoProcessorConfig

VideoSource = bytes | bytearray | memoryview | str | os.PathLike[str]

# transformers' Glm4vProcessor assumes this rate when frames come without metadata.
DEFAULT_FPS_WITHOUT_METADATA = 24.0


@dataclass(frozen=True)
class VideoMetadata:
    """Timing and size of a whole video, as transformers' `read_video_pyav` reports it."""

    total_num_frames: int  # frames in the stream (counted by demuxing when the file has no count)
    fps: float  # the stream's average frame rate
    duration: float  # total_num_frames / fps, in seconds
    width: int
    height: int


@dataclass
class DecodedVideo:
    """The sampled frames of a video; `frames[i]` is source frame `frame_indices[i]`.

    Only the sampled frames are decoded. `frame_indices` may end with a repeated index (the
    samplers pad to an even count); its frame is then repeated too.
    """

    frames: np.ndarray  # [N, H, W, 3] uint8 RGB
    frame_indices: list[int]  # index of each frame in the source, non-decreasing
    metadata: VideoMetadata


@dataclass
class ProcessedVideo:
    """A video ready for the vision tower: one temporal patch per pair of sampled frames."""

    pixel_values: torch.Tensor  # [grid_t*grid_h*grid_w, 3*temporal_patch_size*patch**2] float32
    grid_thw: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches
    timestamps: list[float]  # seconds, one per temporal patch (its first frame)
    frame_indices: list[int]  # source index of every sampled frame
    merge_size: int = 2  # patches merged per side into one LLM token
    content_hash: str = ""  # of the pixels and grid (patchify_normalized); "": hash them

    @property
    def tokens_per_frame(self) -> int:
        """`<|image|>` tokens for one temporal patch."""
        _, h, w = self.grid_thw
        return h * w // self.merge_size**2

    @property
    def num_tokens(self) -> int:
        """`<|image|>` tokens for the whole video."""
        return self.grid_thw[0] * self.tokens_per_frame


# ---------------------------------------------------------------------------------- samplers


def sample_frames_glm4v(metadata: VideoMetadata, fps: float, max_duration: float) -> list[int]:
    """`Glm4vVideoProcessor.sample_frames`: `fps` frames a second, spread over long videos."""
    total_frames = metadata.total_num_frames
    max_frame_idx = total_frames - 1
    duration = metadata.duration or round(max_frame_idx / metadata.fps) + 1
    if duration <= max_duration:
        n = max(math.floor(duration * fps), 1)  # at least one frame
        indices = [min(max_frame_idx, math.ceil(i * metadata.fps / fps)) for i in range(n)]
    else:
        num_samples = int(max_duration * fps)
        if num_samples >= total_frames:
            indices = list(range(total_frames))
        else:
            target_seconds = np.linspace(0, duration, num_samples, endpoint=True)
            indices = [min(max_frame_idx, math.ceil(t * metadata.fps)) for t in target_seconds]
    return _dedupe_and_pad(indices)


# Glm46VVideoProcessor's dynamic rate: target fps by (effective) duration, and caps.
_GLM46V_FPS_BY_DURATION = ((30, 3), (300, 1), (2400, 0.5))
_GLM46V_MAX_FRAMES = 640
_GLM46V_MAX_DURATION = 2400


def sample_frames_glm46v(
    metadata: VideoMetadata, temporal_patch_size: int = 2, fps: float | None = None
) -> list[int]:
    """`Glm46VVideoProcessor.sample_frames`: 3/1/0.5 fps by duration, at most 640 frames.

    The table's rates count frame pairs (temporal patches) per second. `fps` (an extension; the
    official processor ignores its fps argument) replaces the table with `fps` frames a second.
    """
    total_frames = metadata.total_num_frames
    duration = metadata.duration or round((total_frames - 1) / metadata.fps) + 1
    effective_duration = min(duration, _GLM46V_MAX_DURATION)
    target_fps = next(
        (rate for limit, rate in _GLM46V_FPS_BY_DURATION if effective_duration <= limit),
        _GLM46V_FPS_BY_DURATION[-1][1],
    ) if fps is None else fps / temporal_patch_size
    extract_t = min(int(effective_duration * target_fps * temporal_patch_size), _GLM46V_MAX_FRAMES)

    indices: list[int] = []
    if total_frames < extract_t:
        indices = _linspace_int(0, total_frames - 1, extract_t)
    else:
        # Walk the frames in time order, taking one every 1/(tps*target_fps) seconds.
        duration_per_frame = 1 / metadata.fps
        max_second = int(duration)
        current_second: float = 0
        inv_fps = 1 / (temporal_patch_size * target_fps)
        for frame_index in range(total_frames):
            if frame_index * duration_per_frame >= current_second:
                current_second += inv_fps
                indices.append(frame_index)
                if current_second >= max_second:
                    break
    if len(indices) < extract_t:
        start, end = (indices[0], indices[-1]) if indices else (0, max(total_frames - 1, 0))
        indices = _linspace_int(start, end, extract_t)
    elif len(indices) > extract_t:
        indices = _linspace_int(0, total_frames - 1, extract_t)
    return _dedupe_and_pad(indices)


_SAMPLERS: dict[str, Callable[[VideoMetadata, VideoProcessorConfig, float | None], list[int]]] = {
    "glm4v": lambda m, c, fps: sample_frames_glm4v(
        m, c.fps if fps is None else fps, c.max_duration
    ),
    "glm46v": lambda m, c, fps: sample_frames_glm46v(m, c.temporal_patch_size, fps),
}


def sample_frames(
    metadata: VideoMetadata,
    config: VideoProcessorConfig,
    fps: float | None = None,
    num_frames: int | None = None,
) -> list[int]:
    """Frame indices the configured sampler picks.

    `fps` overrides the sampler's rate (frames per second of video); `num_frames` replaces the
    sampler: that many frames evenly spread from the first to the last (like vLLM's video
    loader; fewer if the video has fewer). Both None: exactly the model's own sampler.
    """
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"sampling fps must be > 0, got {fps}")
    if num_frames is not None and (isinstance(num_frames, bool) or num_frames < 1):
        raise VideoError(f"sampling num_frames must be >= 1, got {num_frames}")
    if fps is not None and num_frames is not None:
        raise VideoError("sample frames by fps or by num_frames, not both")
    if metadata.total_num_frames <= 0 or metadata.fps <= 0:
        raise VideoError(f"cannot sample frames: the video has no frames or no rate ({metadata})")
    if num_frames is not None:
        last = metadata.total_num_frames - 1
        return _dedupe_and_pad(_linspace_int(0, last, min(num_frames, last + 1)))
    indices = _SAMPLERS[config.sampler](metadata, config, fps)
    # The glm46v sampler picks nothing for clips shorter than one step (< 1/6 s), where
    # transformers then fails in smart_resize; we use the first frame instead.
    return indices or [0, 0]


def _linspace_int(start: int, stop: int, num: int) -> list[int]:
    # numpy's float linspace truncated to int, exactly as np.linspace(..., dtype=int).
    return [int(i) for i in np.linspace(start, stop, num, dtype=int)]


def _dedupe_and_pad(indices: Sequence[int]) -> list[int]:
    """Drop repeats (keeping order), then repeat the last index if the count is odd."""
    unique = [int(i) for i in dict.fromkeys(int(i) for i in indices)]
    if len(unique) % 2:
        unique.append(unique[-1])
    return unique


# ---------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoChecks:
    """What a caller requires of a video's container before any frame is decoded."""

    max_frames: int | None = None  # source frames, per the metadata (MediaTooLargeError)
    max_seconds: float | None = None  # duration, per the metadata (MediaTooLargeError)
    max_fps: float = 1000.0  # a higher (or non-positive) frame rate is refused (VideoError)
    container_format: str | None = None  # the only FFmpeg demuxer allowed (the sniffed one)

    def check_rate(self, fps: float) -> None:
        if not (math.isfinite(fps) and 0 < fps <= self.max_fps):
            raise VideoError(f"the video reports {fps:g} frames per second; a usable frame rate "
                             f"is above 0 and at most {self.max_fps:g}")

    def check_frames(self, num_frames: int) -> None:
        if self.max_frames is not None and num_frames > self.max_frames:
            raise MediaTooLargeError(f"the video has {num_frames:,} frames, more than the limit "
                                     f"of {self.max_frames:,} (--max-video-frames)")

    def check_seconds(self, seconds: float) -> None:
        if self.max_seconds is not None and seconds > self.max_seconds:
            raise MediaTooLargeError(f"the video lasts {seconds:,.1f} s, longer than the limit "
                                     f"of {self.max_seconds:g} s (--max-video-seconds)")


def probe_video(source: VideoSource, checks: VideoChecks | None = None) -> VideoMetadata:
    """Read a video's metadata without decoding frames (VideoError if it is not a video).

    With `checks`, the frame rate, frame count and duration are checked as soon as the header
    gives them (before frames are counted by demuxing, for containers without a count).
    """
    container_format = checks.container_format if checks else None
    with _open(source, container_format) as container:
        stream = _video_stream(container)
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise VideoError("the video stream does not report a frame rate")
        total = stream.frames
        width, height = stream.width, stream.height
        if checks is not None:
            checks.check_rate(float(rate))
            checks.check_frames(int(total))
            checks.check_seconds(_header_seconds(container, stream))
    if total <= 0:
        # Matroska/WebM (and others) store no frame count; transformers would then sample
        # index -1 and fail, so count the packets (no decoding) to sample correctly.
        limit = checks.max_frames if checks is not None else None
        total = _count_packets(source, container_format, limit)
    if total <= 0:
        raise VideoError("the video has no frames")
    metadata = VideoMetadata(
        total_num_frames=int(total),
        fps=float(rate),
        duration=float(Fraction(total) / Fraction(rate)),  # read_video_pyav's frames / fps
        width=int(width),
        height=int(height),
    )
    if checks is not None:
        checks.check_frames(metadata.total_num_frames)
        checks.check_seconds(metadata.duration)
    return metadata


def _header_seconds(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    """The duration the headers state (0 when they state none)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def decode_video(
    source: VideoSource,
    config: VideoProcessorConfig,
    fps: float | None = None,
    max_frames: int | None = None,
    *,
    num_frames: int | None = None,
    checks: VideoChecks | None = None,
) -> DecodedVideo:
    """Sample frame indices from the metadata, then decode just those frames (RGB).

    `fps` / `num_frames` override the sampler (see `sample_frames`); `max_frames` refuses
    (VideoError) a sampling that would hold more frames than that in memory; `checks` are
    applied to the container before decoding. If the stream turns out shorter than its header
    said, the sampler is run again on the real count.
    """
    metadata = probe_video(source) if checks is None else probe_video(source, checks)
    container_format = checks.container_format if checks else None
    indices = sample_frames(metadata, config, fps, num_frames)
    if max_frames is not None and len(indices) > max_frames:
        raise VideoError(
            f"sampling this video takes {len(indices)} frames, more than the limit of {max_frames}"
        )
    frames, num_decoded = _decode_indices(source, indices, container_format)
    if len(frames) < len(set(indices)):
        # The stream ended early (headers can overstate the count): sample on the real count.
        if num_decoded == 0:
            raise VideoError("the video has no decodable frames")
        metadata = replace(
            metadata,
            total_num_frames=num_decoded,
            duration=float(Fraction(num_decoded) / Fraction(metadata.fps)),
        )
        indices = sample_frames(metadata, config, fps, num_frames)
        frames, _ = _decode_indices(source, indices, container_format)
        if len(frames) < len(set(indices)):
            raise VideoError("the video decodes to a different number of frames on each pass")
    shapes = {frame.shape for frame in frames.values()}
    if len(shapes) != 1:
        raise VideoError(f"the frame size changes inside the video: {sorted(shapes)}")
    stacked = np.stack([frames[i] for i in indices])  # [N, H, W, 3] uint8
    return DecodedVideo(frames=stacked, frame_indices=indices, metadata=metadata)


@contextmanager
def _open(
    source: VideoSource, container_format: str | None = None
) -> Iterator[av.container.InputContainer]:
    """Open a container for reading (with that demuxer only, if named); failures -> VideoError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoError("video data is empty")
        target: io.BytesIO | io.BufferedReader = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise VideoError(f"video file not found: {source}")
        # Opened here, not by FFmpeg by name, and with O_NOFOLLOW: a path checked against
        # --allowed-local-media-path that was swapped for a symlink since is refused.
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise VideoError(f"cannot open video file {os.fspath(source)!r}: {e}") from e
        target = os.fdopen(fd, "rb")
    else:
        raise VideoError(f"unsupported video source type {type(source).__name__}")
    with target:
        try:
            container = av.open(target, mode="r", format=container_format)
        except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
            raise VideoError(
                f"cannot open video: the data is not a readable video file ({e})") from e
        try:
            yield container
        finally:
            container.close()


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    if not container.streams.video:
        raise VideoError("the file has no video stream")
    return container.streams.video[0]


def _count_packets(
    source: VideoSource, container_format: str | None = None, limit: int | None = None
) -> int:
    """Frames in the first video stream, counted from its non-empty packets (stops past limit)."""
    count = 0
    with _open(source, container_format) as container:
        stream = _video_stream(container)
        try:
            for packet in container.demux(stream):
                count += packet.size > 0
                if limit is not None and count > limit:
                    break
            return count
        except av.FFmpegError as e:
            raise VideoError(f"cannot read the video stream: the data is corrupt ({e})") from e


def _decode_indices(
    source: VideoSource, indices: Sequence[int], container_format: str | None = None
) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in order up to the last wanted index, keeping only the wanted ones.

    Returns (index -> [H, W, 3] uint8, frames decoded; fewer than wanted if the stream ended).
    Where the container and codec allow it (`_skippable`), frames that are neither wanted nor
    a reference of another frame are not decoded at all; the frames kept are the same.
    """
    with _opened_stream(source, container_format) as (container, stream):
        if not _skippable(container, stream):
            return _decode_in_order(container, stream, indices)
        skipped = _skipping_decode(container, stream, indices)
    if skipped is not None:
        return skipped, max(indices) + 1
    # The ranks did not hold: every frame in order, from a fresh container.
    with _opened_stream(source, container_format) as (container, stream):
        return _decode_in_order(container, stream, indices)


@contextmanager
def _opened_stream(
    source: VideoSource, container_format: str | None = None
) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """`_open`'s container and its first video stream, set to decode on threads."""
    with _open(source, container_format) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"  # threads change speed only, not the decoded pictures
        yield container, stream


def _decode_in_order(
    container: av.container.InputContainer, stream: av.VideoStream, indices: Sequence[int]
) -> tuple[dict[int, np.ndarray], int]:
    """`_decode_indices` decoding every frame up to the last wanted one, counting them as
    they come out (transformers' read_video_pyav counts the same way); on a container nothing
    has been read from."""
    wanted = set(indices)
    last = max(indices)
    kept: dict[int, np.ndarray] = {}
    num_decoded = 0
    # read_video_pyav seeks to 0 first; if that fails the fresh container is at the start.
    with suppress(av.FFmpegError):
        container.seek(0)
    try:
        for frame in container.decode(stream):
            if num_decoded in wanted:
                kept[num_decoded] = frame.to_ndarray(format="rgb24")
            num_decoded += 1
            if num_decoded > last:
                return kept, num_decoded
    except av.FFmpegError as e:
        raise VideoError(f"cannot decode video frame {num_decoded}: corrupt data ({e})") from e
    return kept, num_decoded


# Where one packet holds one whole picture and its pts orders it among the others, and the
# decoder can leave out pictures no other picture refers to (skip_frame NONREF): a frame's
# index is then its packet's rank by pts, known before decoding. Encoders commonly make half
# the frames of a clip such pictures (x264's defaults: the B-frames but the middle one of a
# pyramid): a 2 fps sampling of a 30 fps 1280x720 or 1920x1080 clip decodes with about a
# third less CPU (bench/media_bench.py).
_SKIPPING_FORMATS = frozenset({"mov", "mp4", "matroska", "webm"})  # FFmpeg demuxers
_SKIPPING_CODECS = frozenset({"h264", "hevc"})


def _skippable(container: av.container.InputContainer, stream: av.VideoStream) -> bool:
    """Whether `_skipping_decode` may try this container and stream (nothing read yet)."""
    return (not _SKIPPING_FORMATS.isdisjoint(container.format.name.split(","))
            and stream.codec_context.name in _SKIPPING_CODECS)


def _skipping_decode(
    container: av.container.InputContainer, stream: av.VideoStream, indices: Sequence[int]
) -> dict[int, np.ndarray] | None:
    """The wanted frames (index -> [H, W, 3] uint8) of a `_skippable` stream, decoding only
    them and the pictures they refer to; None where that cannot be done exactly (packets
    without distinct timestamps, packets an edit list hides, leading pictures the decoder
    drops, a wanted frame that did not come out): the caller then decodes every frame in
    order instead. Every sampler wants frame 0, which is then decoded first."""
    wanted = set(indices)
    try:
        stamps: list[int] = []
        for packet in container.demux(stream):
            if packet.is_discard or packet.is_corrupt:
                return None  # an edit list hides it: the decoder drops its frame
            if packet.size > 0:
                if packet.pts is None:
                    return None
                stamps.append(packet.pts)
        if len(set(stamps)) != len(stamps) or max(wanted) >= len(stamps):
            return None
        index_of: dict[int | None, int] = {pts: i for i, pts in enumerate(sorted(stamps))}
        container.seek(0)
        codec = stream.codec_context
        kept: dict[int, np.ndarray] = {}
        previous = -1
        for packet in container.demux(stream):
            needed = packet.size == 0 or index_of.get(packet.pts, -1) in wanted
            codec.skip_frame = "DEFAULT" if needed else "NONREF"
            for frame in packet.decode():
                index = index_of.get(frame.pts, -1)
                # Out of order, a timestamp no packet had, or a first frame shown after the
                # first packet's (the decoder dropped leading pictures, such as an open GOP's:
                # the frames are then counted as they come out, not by rank).
                if index <= previous or (previous < 0 and index != 0):
                    return None
                previous = index
                if index in wanted:
                    kept[index] = frame.to_ndarray(format="rgb24")
            if len(kept) == len(wanted):
                return kept
    except av.FFmpegError:
        return None  # the plain decode raises its own error, or manages
    return None


# ---------------------------------------------------------------------------------- processing


def process_video(video: DecodedVideo, config: VideoProcessorConfig) -> ProcessedVideo:
    """Resize, normalise and patchify decoded (already sampled) frames like transformers."""
    if len(video.frame_indices) != len(video.frames):
        raise VideoError(f"{len(video.frames)} frames but {len(video.frame_indices)} frame indices")
    return _process_sampled(video.frames, video.frame_indices, video.metadata.fps, config)


def process_frames(
    frames: np.ndarray,
    metadata: VideoMetadata | None,
    config: VideoProcessorConfig,
    sample: bool,
    fps: float | None = None,
) -> ProcessedVideo:
    """Process frames the caller already holds, uint8 [N, H, W, 3].

    sample=True: `frames` is the whole video and the configured sampler (which needs
    `metadata`) picks the frames, as transformers does with `do_sample_frames=True`.
    sample=False: all frames are used; timestamps use `metadata.fps`, or 24 fps without metadata.
    """
    if sample:
        if metadata is None:
            raise VideoError("sampling frames needs the video's metadata (fps, frame count)")
        indices = sample_frames(metadata, config, fps)
        if max(indices) >= len(frames):
            raise VideoError(
                f"the sampler wants frame {max(indices)} but only {len(frames)} frames were given"
            )
        selected = frames[indices]
    else:
        indices, selected = list(range(len(frames))), frames
    video_fps = metadata.fps if metadata is not None else DEFAULT_FPS_WITHOUT_METADATA
    return _process_sampled(selected, indices, video_fps, config)


def _process_sampled(
    frames: np.ndarray, indices: list[int], video_fps: float, config: VideoProcessorConfig
) -> ProcessedVideo:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(
            f"video frames must be uint8 [N, H, W, 3], got {frames.dtype} {list(frames.shape)}"
        )
    num_frames, height, width = frames.shape[:3]
    if not frames.flags.writeable:
        frames = frames.copy()  # torch.from_numpy wants writable memory
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # channels last
    try:
        # One size for the whole clip: the area budget is shared by all sampled frames.
        resized_h, resized_w = target_size(config, num_frames, height, width)
    except ImageError as e:
        raise VideoError(f"cannot resize video of {num_frames} frames {height}x{width}: {e}") from e
    resized = resize_frames(tensor, resized_h, resized_w)  # [N, 3, h, w] uint8
    pixel_values, grid_thw, digest = patchify_normalized(resized, config, "video")
    return ProcessedVideo(
        pixel_values=pixel_values,
        grid_thw=grid_thw,
        timestamps=_pair_timestamps(indices, video_fps, grid_thw[0]),
        frame_indices=list(indices),
        merge_size=config.merge_size,
        content_hash=digest,
    )


def _pair_timestamps(indices: Sequence[int], video_fps: float, grid_t: int) -> list[float]:
    """Time of the first frame of each temporal patch, as Glm4vProcessor.replace_video_token."""
    # transformers takes every other timestamp (the 2 of temporal_patch_size is hard-coded there).
    selected = [index / video_fps for index in indices][::2][:grid_t]
    while len(selected) < grid_t:
        selected.append(selected[-1] if selected else 0.0)
    return selected


# Prompt text of a timestamp. GLM-4.6V: the protocol notes a [CONFLICT] (vLLM truncates to whole
# seconds before formatting); we follow transformers, the reference, and format the float.
_TIMESTAMP_FORMATS: dict[str, Callable[[float], str]] = {
    "integer": lambda t: str(int(t)),
    "seconds": lambda t: f"{t:.1f} seconds",
}


def timestamp_text(seconds: float, style: str) -> str:
    """A frame pair's timestamp as the processor writes it into the prompt."""
    try:
        return _TIMESTAMP_FORMATS[style](seconds)
    except KeyError:
        raise VideoError(
            f"unknown timestamp style {style!r}; expected one of {sorted(_TIMESTAMP_FORMATS)}"
        ) from None
