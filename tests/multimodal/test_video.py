"""Video decoding, sampling and preprocessing parity with transformers' GLM-V video processors."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest
import torch

import glmv.multimodal.video as video_module
from glmv.errors import MediaError, VideoError
from glmv.multimodal.video import (
    DecodedVideo,
    ProcessedVideo,
    VideoMetadata,
    decode_video,
    probe_video,
    process_frames,
    process_video,
    sample_frames_glm4v,
    sample_frames_glm46v,
    timestamp_text,
)
from tests.multimodal.conftest import (
    CHECKPOINT_VIDEO_SIZE,
    WriteVideo,
    gradient_frame,
    video_config_for,
)

transformers = pytest.importorskip("transformers", reason="transformers is the reference")
from transformers import (  # noqa: E402
    Glm4vProcessor,
    Glm4vVideoProcessor,
    Glm46VProcessor,
    Glm46VVideoProcessor,
)
from transformers.video_utils import VideoMetadata as HfVideoMetadata  # noqa: E402
from transformers.video_utils import load_video  # noqa: E402

FLAVOURS = ("glm4v", "glm46v")
HF_CLASSES: dict[str, tuple[Any, Any]] = {
    "glm4v": (Glm4vVideoProcessor, Glm4vProcessor),
    "glm46v": (Glm46VVideoProcessor, Glm46VProcessor),
}


@pytest.fixture(scope="module")
def hf_video_processors() -> dict[str, Any]:
    return {name: cls(size=dict(CHECKPOINT_VIDEO_SIZE)) for name, (cls, _) in HF_CLASSES.items()}


def metadata_dict(metadata: VideoMetadata) -> dict[str, Any]:
    return {
        "total_num_frames": metadata.total_num_frames,
        "fps": metadata.fps,
        "duration": metadata.duration,
        "width": metadata.width,
        "height": metadata.height,
    }


def load_all_frames(path: Path) -> tuple[np.ndarray, Any]:
    """Every frame and the metadata, by transformers' own PyAV reader."""
    frames, metadata = load_video(
        str(path),
        backend="pyav",
        sample_indices_fn=lambda metadata, **_: np.arange(metadata.total_num_frames),
    )
    return frames, metadata


def all_decoded_frames(path: Path) -> np.ndarray:
    """Every frame the decoder gives, in order (however many the header states)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def hf_run(processor: Any, frames: np.ndarray, metadata: Any, **kwargs: Any) -> Any:
    return processor(
        videos=[frames],
        video_metadata=[metadata],
        return_metadata=True,
        return_tensors="pt",
        **{"do_sample_frames": True, **kwargs},
    )


def hf_prompt(flavour: str, outputs: Any) -> str:
    """transformers' expansion of one `<|video|>` (Glm4vProcessor.replace_video_token)."""
    processor_cls = HF_CLASSES[flavour][1]
    fake = SimpleNamespace(image_token="<|image|>", video_processor=SimpleNamespace(merge_size=2))
    fake.replace_frame_token_id = partial(processor_cls.replace_frame_token_id, fake)
    return str(processor_cls.replace_video_token(fake, outputs, 0))


def our_prompt(processed: ProcessedVideo, style: str) -> str:
    image_tokens = "<|image|>" * processed.tokens_per_frame
    return "".join(
        f"<|begin_of_image|>{image_tokens}<|end_of_image|>{timestamp_text(t, style)}"
        for t in processed.timestamps
    )


def assert_matches_hf(ours: ProcessedVideo, outputs: Any, flavour: str) -> None:
    assert [list(ours.grid_thw)] == outputs["video_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values, outputs["pixel_values_videos"], rtol=0, atol=0)
    # replace_video_token first: it fills in transformers' fallback fps of 24 when none is known.
    assert our_prompt(ours, video_config_for(flavour).timestamp_style) == hf_prompt(
        flavour, outputs
    )
    hf_metadata = outputs["video_metadata"][0]
    assert ours.frame_indices == [int(i) for i in hf_metadata.frames_indices]
    expected_times = [float(t) for t in hf_metadata.timestamps[::2]][: ours.grid_thw[0]]
    assert ours.timestamps[: len(expected_times)] == expected_times
    merge = 2
    assert ours.num_tokens == int(outputs["video_grid_thw"][0].prod()) // merge**2


# ------------------------------------------------------------------- decoded files vs transformers

VIDEO_CASES = {
    # name: (frames, fps, width, height, codec)
    "3s_10fps": (30, 10, 64, 48, "mpeg4"),
    "2.5s_160x120_x264": (25, 10, 160, 120, "libx264"),  # odd frame count, odd samplings
    "one_frame": (1, 10, 64, 48, "mpeg4"),
    "45s_2fps": (90, 2, 32, 32, "mpeg4"),  # glm46v: the 30..300 s band (1 fps)
    "320s_1fps": (320, 1, 32, 32, "mpeg4"),  # past glm4v's 300 s cap and glm46v's 300 s band
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("case", list(VIDEO_CASES))
def test_video_files_match_transformers(
    write_video: WriteVideo, hf_video_processors: dict[str, Any], flavour: str, case: str
) -> None:
    num_frames, fps, width, height, codec = VIDEO_CASES[case]
    if case == "one_frame" and flavour == "glm46v":
        pytest.skip("transformers fails here; see test_glm46v_clip_shorter_than_one_step")
    path = write_video(f"{case}.mp4", num_frames, fps, width, height, codec=codec)
    config = video_config_for(flavour)

    decoded = decode_video(path, config)
    ours = process_video(decoded, config)

    all_frames, hf_metadata = load_all_frames(path)
    assert metadata_dict(decoded.metadata) == {
        key: getattr(hf_metadata, key) for key in metadata_dict(decoded.metadata)
    }
    outputs = hf_run(hf_video_processors[flavour], all_frames, hf_metadata)
    assert_matches_hf(ours, outputs, flavour)
    assert np.array_equal(decoded.frames, all_frames[decoded.frame_indices])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_decode_matches_transformers_load_video(
    write_video: WriteVideo, hf_video_processors: dict[str, Any], flavour: str
) -> None:
    path = write_video("clip.mp4", 30, 10)
    config = video_config_for(flavour)
    decoded = decode_video(path, config)
    frames, metadata = load_video(
        str(path), backend="pyav", sample_indices_fn=hf_video_processors[flavour].sample_frames
    )
    assert decoded.metadata == VideoMetadata(
        total_num_frames=metadata.total_num_frames,
        fps=metadata.fps,
        duration=metadata.duration,
        width=metadata.width,
        height=metadata.height,
    )
    assert decoded.frame_indices == [int(i) for i in metadata.frames_indices]
    # transformers keeps one copy of a repeated index; we keep one frame per index.
    unique_positions = [decoded.frame_indices.index(i) for i in sorted(set(decoded.frame_indices))]
    assert np.array_equal(decoded.frames[unique_positions], frames)
    assert decoded.frames.dtype == np.uint8 and decoded.frames.shape[1:] == (48, 64, 3)

    from_bytes = decode_video(path.read_bytes(), config)
    assert from_bytes.metadata == decoded.metadata
    assert np.array_equal(from_bytes.frames, decoded.frames)
    assert probe_video(path) == decoded.metadata


@pytest.mark.parametrize("fps", [1, 5])
def test_requested_fps_matches_transformers(
    write_video: WriteVideo, hf_video_processors: dict[str, Any], fps: int
) -> None:
    path = write_video("clip.mp4", 30, 10)
    config = video_config_for("glm4v")
    ours = process_video(decode_video(path, config, fps=fps), config)
    all_frames, metadata = load_all_frames(path)
    outputs = hf_run(hf_video_processors["glm4v"], all_frames, metadata, fps=fps)
    assert_matches_hf(ours, outputs, "glm4v")


@pytest.mark.parametrize(
    ("name", "codec", "container_format"),
    [("clip.webm", "libvpx", "webm"), ("clip.mkv", "mpeg4", "matroska")],
)
def test_container_without_frame_count(
    write_video: WriteVideo,
    hf_video_processors: dict[str, Any],
    name: str,
    codec: str,
    container_format: str,
) -> None:
    path = write_video(name, 30, 10, codec=codec, container_format=container_format)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # no count in the header
    reference = all_decoded_frames(path)
    # transformers' read_video_pyav then reports 0 frames, samples index -1 and fails.
    with pytest.raises(ValueError):
        load_video(
            str(path), backend="pyav", sample_indices_fn=hf_video_processors["glm4v"].sample_frames
        )

    metadata = probe_video(path)
    assert (metadata.total_num_frames, metadata.fps, metadata.duration) == (30, 10.0, 3.0)
    for flavour in FLAVOURS:
        config = video_config_for(flavour)
        decoded = decode_video(path, config)
        assert np.array_equal(decoded.frames, reference[decoded.frame_indices])
        outputs = hf_run(hf_video_processors[flavour], reference, metadata_dict(metadata))
        assert_matches_hf(process_video(decoded, config), outputs, flavour)


# ------------------------------------------------------------------- frames held by the caller


def synthetic_frames(num_frames: int, width: int = 80, height: int = 60) -> np.ndarray:
    return np.stack([gradient_frame(i, width, height) for i in range(num_frames)])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_process_frames_with_sampling(hf_video_processors: dict[str, Any], flavour: str) -> None:
    frames = synthetic_frames(50)
    metadata = VideoMetadata(total_num_frames=50, fps=25.0, duration=2.0, width=80, height=60)
    ours = process_frames(frames, metadata, video_config_for(flavour), sample=True)
    outputs = hf_run(hf_video_processors[flavour], frames, metadata_dict(metadata))
    assert_matches_hf(ours, outputs, flavour)
    with pytest.raises(VideoError, match="metadata"):
        process_frames(frames, None, video_config_for(flavour), sample=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("num_frames", [4, 5])
def test_process_frames_without_sampling(
    hf_video_processors: dict[str, Any], flavour: str, num_frames: int
) -> None:
    frames = synthetic_frames(num_frames)  # 5: odd, the last frame is repeated in patchify
    ours = process_frames(frames, None, video_config_for(flavour), sample=False)
    outputs = hf_video_processors[flavour](
        videos=[frames], do_sample_frames=False, return_metadata=True, return_tensors="pt"
    )
    assert_matches_hf(ours, outputs, flavour)  # timestamps at transformers' fallback 24 fps
    assert ours.timestamps[1] == 2 / 24

    metadata = VideoMetadata(num_frames, 10.0, num_frames / 10, 80, 60)
    with_rate = process_frames(frames, metadata, video_config_for(flavour), sample=False)
    outputs = hf_video_processors[flavour](
        videos=[frames],
        video_metadata=[{**metadata_dict(metadata), "frames_indices": list(range(num_frames))}],
        do_sample_frames=False,
        return_metadata=True,
        return_tensors="pt",
    )
    assert_matches_hf(with_rate, outputs, flavour)


def test_single_frame_without_sampling_is_refused(hf_video_processors: dict[str, Any]) -> None:
    frames = synthetic_frames(1)
    with pytest.raises(ValueError, match="temporal_factor"):
        hf_video_processors["glm4v"](videos=[frames], do_sample_frames=False)
    with pytest.raises(VideoError, match="temporal_factor"):
        process_frames(frames, None, video_config_for("glm4v"), sample=False)


def test_glm46v_clip_shorter_than_one_step(
    write_video: WriteVideo, hf_video_processors: dict[str, Any]
) -> None:
    # 0.1 s: the glm46v sampler picks no frame and transformers fails; we use frame 0 twice.
    path = write_video("short.mp4", 1, 10)
    frames, metadata = load_all_frames(path)
    with pytest.raises(ValueError):
        hf_run(hf_video_processors["glm46v"], frames, metadata)
    config = video_config_for("glm46v")
    decoded = decode_video(path, config)
    assert decoded.frame_indices == [0, 0]
    assert process_video(decoded, config).grid_thw[0] == 1


# ------------------------------------------------------------------- samplers and timestamps

SAMPLER_METADATA = [
    # (total_num_frames, fps, duration)
    (1, 10.0, 0.1),
    (2, 30.0, 2 / 30),
    (30, 10.0, 3.0),
    (31, 10.0, 3.1),
    (300, 29.97, 300 / 29.97),
    (900, 30.0, 30.0),
    (901, 30.0, 901 / 30),
    (5400, 30.0, 180.0),
    (9000, 30.0, 300.0),
    (9030, 30.0, 301.0),
    (320, 1.0, 320.0),
    (100, 0.5, 200.0),
    (48000, 24.0, 2000.0),
    (150000, 25.0, 6000.0),
    (25, 25.0, 0.0),  # no duration: both samplers fall back to round((N-1)/fps)+1
    (7, 2.0, 3.5),
]


@pytest.mark.parametrize(("total", "fps", "duration"), SAMPLER_METADATA)
def test_samplers_match_transformers(
    hf_video_processors: dict[str, Any], total: int, fps: float, duration: float
) -> None:
    ours = VideoMetadata(total, fps, duration, 64, 48)
    theirs = HfVideoMetadata(total_num_frames=total, fps=fps, duration=duration)
    for requested_fps in (0.5, 1, 2, 3):
        expected = hf_video_processors["glm4v"].sample_frames(theirs, fps=requested_fps).tolist()
        assert sample_frames_glm4v(ours, requested_fps, 300) == expected
    expected = hf_video_processors["glm46v"].sample_frames(theirs).tolist()
    assert sample_frames_glm46v(ours, 2) == expected


def test_timestamp_text_matches_transformers() -> None:
    fake = SimpleNamespace(image_token="<|image|>")
    prefix = "<|begin_of_image|><|image|><|end_of_image|>"
    for seconds in (0.0, 1 / 3, 0.5, 0.9999, 1.05, 2.25, 59.95, 299.5, 1234.56):
        for processor_cls, style in ((Glm4vProcessor, "integer"), (Glm46VProcessor, "seconds")):
            expected = processor_cls.replace_frame_token_id(fake, seconds, num_image_tokens=1)
            assert prefix + timestamp_text(seconds, style) == expected
    assert timestamp_text(1 / 3, "seconds") == "0.3 seconds"
    assert timestamp_text(1.9, "integer") == "1"
    with pytest.raises(VideoError, match="timestamp style"):
        timestamp_text(1.0, "minutes")


# ------------------------------------------------------------------- limits and errors


def test_decoding_stops_after_the_last_needed_frame(write_video: WriteVideo) -> None:
    path = write_video("clip.mp4", 30, 10)
    kept, num_decoded = video_module._decode_indices(path, [0, 4, 4])
    # 5 of the clip's 30 frames decoded: it stopped right after the last wanted one.
    assert sorted(kept) == [0, 4] and num_decoded == 5


def test_a_clip_the_skipping_decode_cannot_take_is_opened_once(
    write_video: WriteVideo, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_video("clip.mp4", 30, 10)  # MPEG-4 part 2: frame by frame
    opened = []
    real_open = video_module._open

    def counting_open(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(video_module, "_open", counting_open)
    kept, num_decoded = video_module._decode_indices(path, [0, 4, 4])
    assert sorted(kept) == [0, 4] and num_decoded == 5 and len(opened) == 1


def _skipping(path: Path, indices: list[int]) -> dict[int, np.ndarray] | None:
    """The skipping decode alone, on a container and codec it may try."""
    with video_module._opened_stream(path) as (container, stream):
        assert video_module._skippable(container, stream)
        return video_module._skipping_decode(container, stream, indices)


def _num_referenced_frames(path: Path) -> int:
    """Frames the decoder outputs when it leaves out every picture nothing refers to."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        return sum(1 for _ in container.decode(stream))


@pytest.mark.parametrize(
    ("name", "codec", "container_format"),
    [("clip.mp4", "libx264", None), ("clip.mkv", "libx264", "matroska"),
     ("clip.mov", "libx265", None)],
)
def test_frames_nothing_refers_to_are_skipped_exactly(
    write_video: WriteVideo, name: str, codec: str, container_format: str | None
) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path = write_video(name, 40, 10, 64, 48, codec=codec, container_format=container_format)
    reference = all_decoded_frames(path)
    # the encoder made B-frames that nothing refers to: there is something to skip
    assert _num_referenced_frames(path) < len(reference) == 40
    for indices in ([0, 4, 8, 12], [1, 2, 3, 39], list(range(40)), [5, 5]):
        kept = _skipping(path, indices)
        assert kept is not None and sorted(kept) == sorted(set(indices))
        for index, frame in kept.items():
            assert np.array_equal(frame, reference[index])
        kept, num_decoded = video_module._decode_indices(path, indices)
        assert num_decoded == max(indices) + 1 and sorted(kept) == sorted(set(indices))
    assert _skipping(path, [0, 40]) is None  # past the end: the plain path


def test_frames_an_edit_list_hides_are_never_counted(
    write_video: WriteVideo, tmp_path: Path
) -> None:
    """A clip cut without re-encoding keeps packets that its edit list hides (the decoder
    drops their frames): indices count the frames shown, as a plain decode counts them."""
    source = write_video("clip.mp4", 30, 10, 64, 48, codec="libx264")
    trimmed = tmp_path / "trimmed.mp4"
    with av.open(str(source)) as src, av.open(str(trimmed), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        shift = 3 * int(1 / (stream.time_base * 10))  # three frames before the start
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = out
            dst.mux(packet)
    with av.open(str(trimmed)) as container:
        assert any(p.is_discard for p in container.demux(video=0))
    reference = all_decoded_frames(trimmed)
    assert len(reference) == 27
    assert _skipping(trimmed, [0, 5]) is None
    kept, _ = video_module._decode_indices(trimmed, [0, 5, 26])
    assert all(np.array_equal(kept[i], reference[i]) for i in (0, 5, 26))


def test_leading_pictures_the_decoder_drops_are_never_counted(tmp_path: Path) -> None:
    """A clip whose first IDR picture was cut away: the decoder drops the pictures before the
    next one, with no flag on their packets. Indices count the frames that come out, as a
    plain decode counts them, not the packets."""
    whole, cut = tmp_path / "whole.mp4", tmp_path / "cut.mp4"
    with av.open(str(whole), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"x264-params": "keyint=8:min-keyint=8:scenecut=0"}
        for index in range(30):
            frame = av.VideoFrame.from_ndarray(gradient_frame(index, 64, 48), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(whole)) as src, av.open(str(cut), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        packets = [p for p in src.demux(stream) if p.dts is not None]
        for packet in packets[1:]:  # without the first IDR picture
            packet.stream = out
            dst.mux(packet)
    reference = all_decoded_frames(cut)
    assert 0 < len(reference) < 29  # the pictures before the second IDR are gone
    assert _skipping(cut, [8, 12]) is None
    kept, _ = video_module._decode_indices(cut, [8, 12])
    assert all(np.array_equal(kept[i], reference[i]) for i in (8, 12))


def test_header_overstating_the_frame_count(
    write_video: WriteVideo, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_video("clip.mp4", 30, 10)
    real = probe_video(path)
    monkeypatch.setattr(
        video_module, "probe_video", lambda source: replace(real, total_num_frames=60, duration=6.0)
    )
    config = video_config_for("glm4v")
    decoded = decode_video(path, config)  # would want frames up to 55; re-sampled on 30
    assert decoded.metadata == real
    assert decoded.frame_indices == sample_frames_glm4v(real, 2, 300)


def test_max_frames_limit(write_video: WriteVideo) -> None:
    path = write_video("clip.mp4", 30, 10)
    assert len(decode_video(path, video_config_for("glm4v"), max_frames=6).frame_indices) == 6
    with pytest.raises(VideoError, match="limit of 4"):
        decode_video(path, video_config_for("glm4v"), max_frames=4)


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_unreadable_videos_raise_video_error(write_video: WriteVideo, tmp_path: Path) -> None:
    config = video_config_for("glm4v")
    rng = np.random.default_rng(0)
    with pytest.raises(VideoError, match="not a readable video"):
        decode_video(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), config)
    data = write_video("clip.mp4", 30, 10).read_bytes()
    with pytest.raises(VideoError):
        decode_video(data[: len(data) // 2], config)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a video at all\n" * 20)
    with pytest.raises(VideoError, match="not a readable video"):
        probe_video(text_file)
    with pytest.raises(VideoError, match="no video stream"):
        probe_video(write_audio_only(tmp_path / "sound.wav"))
    with pytest.raises(VideoError, match="empty"):
        probe_video(b"")
    with pytest.raises(VideoError, match="not found"):
        probe_video(tmp_path / "missing.mp4")
    assert issubclass(VideoError, MediaError)


def test_decoded_video_contract(write_video: WriteVideo) -> None:
    path = write_video("odd.mp4", 31, 10, codec="libx264")
    config = video_config_for("glm46v")
    decoded = decode_video(path, config)
    assert isinstance(decoded, DecodedVideo)
    assert len(decoded.frames) == len(decoded.frame_indices) and len(decoded.frame_indices) % 2 == 0
    processed = process_video(decoded, config)
    assert processed.frame_indices == decoded.frame_indices
    assert len(processed.timestamps) == processed.grid_thw[0]
    assert processed.tokens_per_frame * processed.grid_thw[0] == processed.num_tokens
    with pytest.raises(VideoError, match="frame indices"):
        process_video(replace(decoded, frame_indices=decoded.frame_indices[:-1]), config)


def test_a_video_path_that_became_a_symlink_is_not_followed(tmp_path: Path) -> None:
    # The path was checked against the allowed folders; if it is a symlink by the time it is
    # opened (swapped in since), the open fails instead of reading whatever it points to.
    from tests.helpers import write_mp4

    real = write_mp4(tmp_path / "real.mp4")
    assert probe_video(real).total_num_frames == 8
    link = tmp_path / "link.mp4"
    link.symlink_to(real)
    with pytest.raises(VideoError, match="cannot open video file"):
        probe_video(link)
