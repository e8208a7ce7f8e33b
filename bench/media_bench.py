"""Media preprocessing: video decoding of the sampled frames, and whole requests' media.

    python bench/media_bench.py [--rounds 3] [--threads 1] [--requests-only]

Writes H.264 MP4 clips (libx264's defaults: B-frames) of a gradient drifting across light noise
into a temporary folder: the bench clips (224x224, 8 fps, 2 s; 32 of them) and 10 s at 30 fps in
1280x720 and 1920x1080; and 32 of the bench's 448x448 PNG pictures. Best of --rounds,
alternating, per clip or picture:

- decode: the frames the checkpoint's sampler picks, by `_decode_in_order` (every frame up to
  the last wanted one) and by `_decode_indices` (which skips the frames that are neither
  wanted nor referred to, where it can): CPU and wall ms. Checks that both keep the same frames.
- request: `process_chat` of a message with the clip or picture by file URL, as the server's
  media threads run it (read, sniff, probe, decode, resize, patches, content hash, prompt
  tokens): CPU and wall ms.

torch runs --threads threads (a media thread of the server runs one). --requests-only times the
requests alone, with nothing but the processor's public calls: run it with PYTHONPATH at a
worktree of another commit to compare versions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch
from workloads import bench_checkpoint, make_image

from glmv.multimodal import video as video_module
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor


def write_clip(path: Path, width: int, height: int, num_frames: int, fps: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            rgb = np.stack([(x + 3 * i + seed) % 256, (y + 2 * i) % 256, ((x + y) // 2 + i) % 256],
                           axis=-1)
            rgb = np.clip(rgb + rng.integers(-4, 5, rgb.shape), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def in_order(clip: Path, indices: list[int]) -> tuple[dict[int, np.ndarray], int]:
    """The frame-by-frame decode alone."""
    with video_module._opened_stream(clip) as (container, stream):
        return video_module._decode_in_order(container, stream, indices)


def timed_ms(run: Callable[..., object], jobs: list[tuple[object, ...]]) -> tuple[float, float]:
    """CPU and wall ms per job of run(*job) over all the jobs."""
    cpu, wall = time.process_time(), time.perf_counter()
    for job in jobs:
        run(*job)
    return ((time.process_time() - cpu) * 1e3 / len(jobs),
            (time.perf_counter() - wall) * 1e3 / len(jobs))


def best(timings: list[tuple[float, float]]) -> str:
    return f"{min(c for c, _ in timings):.1f} / {min(w for _, w in timings):.1f}"


def message(path: Path) -> list[dict[str, object]]:
    kind = "image_url" if path.suffix == ".png" else "video_url"
    return [{"role": "user", "content": [{"type": kind, kind: {"url": path.as_uri()}},
                                         {"type": "text", "text": "What is shown here?"}]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--requests-only", action="store_true",
                        help="time whole requests only (public calls: any glmv version)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="glmv-media-bench-"))
    processor = MultiModalProcessor.from_pretrained(
        bench_checkpoint("glm-4.1v-thinking"),
        media_policy=MediaPolicy(allowed_local_paths=(str(folder),)))
    pictures = []
    for i in range(32):
        make_image(i).save(folder / f"picture-{i}.png")
        pictures.append(folder / f"picture-{i}.png")
    sets = {
        "448x448 PNG picture": pictures,
        "224x224, 8 fps, 2 s (bench clips)":
            [write_clip(folder / f"bench-{i}.mp4", 224, 224, 16, 8, i) for i in range(32)],
        "1280x720, 30 fps, 10 s": [write_clip(folder / "720p.mp4", 1280, 720, 300, 30, 0)],
        "1920x1080, 30 fps, 10 s": [write_clip(folder / "1080p.mp4", 1920, 1080, 300, 30, 0)],
    }
    if args.requests_only:
        print("| media | request: CPU / wall ms |\n|---|---|")
    else:
        print("| media | sampled frames | decode frame by frame: CPU / wall ms | decode skipping: "
              "CPU / wall ms | request: CPU / wall ms |\n|---|---|---|---|---|")
    for name, items in sets.items():
        runs: dict[str, tuple[Callable[..., object], list[tuple[object, ...]]]] = {}
        cells = []
        if not args.requests_only and items[0].suffix == ".mp4":
            config = processor.video_config
            indices = [video_module.sample_frames(video_module.probe_video(c), config)
                       for c in items]
            jobs: list[tuple[object, ...]] = list(zip(items, indices, strict=True))
            for clip, wanted in zip(items, indices, strict=True):
                plain, _ = in_order(clip, wanted)
                skipped, _ = video_module._decode_indices(clip, wanted)
                if sorted(plain) != sorted(skipped) or any(
                        not np.array_equal(plain[i], skipped[i]) for i in plain):
                    raise SystemExit(f"{clip}: the two decodes kept different frames")
            runs["plain"] = (in_order, jobs)
            runs["skip"] = (video_module._decode_indices, jobs)
            cells.append(str(len(set(indices[0]))))
        elif not args.requests_only:
            cells += ["", "", ""]
        runs["request"] = (processor.process_chat, [(message(p),) for p in items])
        processor.process_chat(message(items[0]))  # first-call costs out of the timings
        timings: dict[str, list[tuple[float, float]]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, (run, arguments) in runs.items():
                timings[key].append(timed_ms(run, arguments))
        cells += [best(t) for t in timings.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
