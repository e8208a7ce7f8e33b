"""Command line: `glmv serve`, `glmv generate`, `glmv make-tiny`.

Errors glmv raises on purpose (bad input, missing files) print as one line on stderr with exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from glmv import __version__
from glmv.config import DTYPE_NAMES
from glmv.engine.config import add_parallel_flags, parallel_kwargs
from glmv.errors import GlmvError
from glmv.server.config import DEFAULT_MAX_REQUEST_BYTES
from glmv.tiny.variants import SIZES, VARIANTS

_MIB = 1024**2


def _size_bytes(text: str) -> int:
    """'2GB', '500MB', '1024' (bytes) -> bytes."""
    units = {"KB": 1024, "MB": _MIB, "GB": 1024**3, "B": 1}
    upper = text.strip().upper()
    try:
        for suffix, factor in units.items():
            if upper.endswith(suffix):
                return int(float(upper[: -len(suffix)]) * factor)
        return int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use e.g. 500MB, 2GB or a number of bytes") from None


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a random-weight checkpoint of a GLM-V variant")
    p.add_argument("out", help="folder to write")
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--size", default="tiny", choices=SIZES,
                   help="tiny: a few million parameters (tests); bench: a few hundred million "
                        "with the real vocabulary (benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    p.add_argument("--fp8", action="store_true",
                   help="store linear weights block-wise in FP8 (GLM-4.5V-FP8 format)")
    p.add_argument("--max-shard-size", default="2GB", type=_size_bytes,
                   help="shard the safetensors above this size (e.g. 500MB)")
    p.set_defaults(func=_make_tiny)


def _make_tiny(args: argparse.Namespace) -> int:
    from glmv.tiny.writer import TinyCheckpointSpec, write_checkpoint

    spec = TinyCheckpointSpec(args.variant, args.size, args.seed, args.dtype, args.fp8,
                              args.max_shard_size)
    start = time.perf_counter()
    path = write_checkpoint(args.out, spec)
    print(f"wrote {args.variant} ({args.size}, RANDOM WEIGHTS, seed {args.seed}) to {path} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt (text, images, video)")
    p.add_argument("--model", default="demo",
                   help="checkpoint folder or hub id; 'demo' (default) or 'demo:<variant>' is "
                        "the built-in random-weight demo model")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path or URL (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-thinking", action="store_true",
                   help="chat_template_kwargs enable_thinking=false (hybrid models)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="reasoning tokens before </think> is forced")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default 4 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens (default: the model's, capped by the KV cache)")
    add_parallel_flags(p)
    p.add_argument("--quantization", choices=("int8",), default=None,
                   help="int8: W8A8 int8 products in the decoder (CPU, AVX512-VNNI)")
    p.add_argument("--show-special-tokens", action="store_true",
                   help="print special tokens (e.g. grounding boxes) in the output")
    p.set_defaults(func=_generate)


def _messages(args: argparse.Namespace) -> list[dict[str, object]]:
    content: list[dict[str, object]] = [{"type": "image_url", "image_url": {"url": str(i)}}
                                        for i in args.image]
    content += [{"type": "video_url", "video_url": {"url": str(v)}} for v in args.video]
    content.append({"type": "text", "text": args.prompt})
    messages: list[dict[str, object]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": content})
    return messages


def _check_generate_args(args: argparse.Namespace) -> None:
    """Reject values the sampler or the device would fail on later with a bare traceback."""
    import torch

    if args.max_tokens < 1:
        raise GlmvError("--max-tokens must be at least 1")
    if not args.temperature >= 0:  # also catches nan
        raise GlmvError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise GlmvError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise GlmvError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.kv_cache_memory is not None and not args.kv_cache_memory > 0:
        raise GlmvError(f"--kv-cache-memory must be > 0 GiB, got {args.kv_cache_memory}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise GlmvError(f"--device {args.device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise GlmvError(f"--device {args.device!r}: no such CUDA device "
                        f"({torch.cuda.device_count()} visible)")


def _generate(args: argparse.Namespace) -> int:
    from glmv.demo import is_demo
    from glmv.engine.config import EngineArgs
    from glmv.engine.parallel import is_worker_process, run_worker
    from glmv.llm import LLM
    from glmv.sampling_params import SamplingParams

    _check_generate_args(args)
    engine_kwargs = dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                         max_model_len=args.max_model_len, quantization=args.quantization,
                         **parallel_kwargs(args))
    engine_args = EngineArgs(args.model, **engine_kwargs)
    if is_worker_process(engine_args):  # a rank > 0 under torchrun or on another node
        run_worker(engine_args)
        return 0
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=tuple(args.stop), thinking_budget=args.thinking_budget,
        skip_special_tokens=not args.show_special_tokens)
    if is_demo(args.model):
        print("glmv: using the built-in demo model (RANDOM WEIGHTS: the output is meaningless)",
              file=sys.stderr)
    llm = LLM(args.model, **engine_kwargs)
    kwargs = {"enable_thinking": False} if args.no_thinking else {}
    start = time.perf_counter()
    try:
        output = llm.chat(_messages(args), params, chat_template_kwargs=kwargs,
                          use_tqdm=False)[0]
    finally:
        llm.shutdown()
    elapsed = time.perf_counter() - start
    completion = output.outputs[0]
    print(completion.text)
    print(f"glmv: {output.num_prompt_tokens} prompt tokens ({output.num_image_tokens} image, "
          f"{output.num_video_tokens} video), {len(completion.token_ids)} generated in "
          f"{elapsed:.2f}s, finish_reason={completion.finish_reason}", file=sys.stderr)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (vLLM's flag names)")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder or hub id (default: the built-in demo model)")
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the model (default: the model argument)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this key (Authorization: Bearer KEY); repeatable; "
                        "also read from GLMV_API_KEY")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens computed per step (default 512 on CPU, 2048 on GPU)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default 4 on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--quantization", choices=("int8",), default=None,
                   help="int8: W8A8 int8 products in the decoder (CPU, AVX512-VNNI)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    p.add_argument("--limit-mm-per-prompt", default=None,
                   help='media items per request, e.g. \'{"image": 8, "video": 2}\'')
    p.add_argument("--allowed-local-media-path", action="append", default=[],
                   help="folder whose files requests may name (file:// or a path); repeatable")
    p.add_argument("--allowed-media-domains", nargs="+", default=None,
                   help="only these domains may serve media URLs")
    p.add_argument("--allow-private-media-urls", action="store_true",
                   help="allow media URLs on loopback/private/link-local addresses (unsafe)")
    p.add_argument("--media-io-kwargs", default=None,
                   help='e.g. \'{"video": {"fps": 1}}\'')
    p.add_argument("--media-fetch-timeout", type=float, default=None,
                   help="seconds one media download may take (default 10)")
    p.add_argument("--max-media-bytes", type=int, default=None,
                   help="bytes per image, video or document (default 64 MiB)")
    p.add_argument("--max-media-redirects", type=int, default=None,
                   help="redirects followed per media URL, each re-checked (default 5)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="pixels per image, checked from its header before decoding")
    p.add_argument("--max-video-frames", type=int, default=None,
                   help="frames per video (from its metadata, before decoding)")
    p.add_argument("--max-video-seconds", type=float, default=None,
                   help="duration per video in seconds")
    p.add_argument("--max-document-pages", type=int, default=None,
                   help="pages per PDF/PPT document")
    p.add_argument("--document-max-visual-tokens", type=int, default=None,
                   help="visual tokens per document (pages are rendered to fit)")
    p.add_argument("--office-timeout", type=float, default=None,
                   help="seconds a PPT/PPTX conversion through LibreOffice may take")
    p.add_argument("--chat-template", default=None, help="template file or text")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests send their own chat_template (run sandboxed)")
    p.add_argument("--default-chat-template-kwargs", default=None,
                   help='e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--mm-max-concurrent-calls", type=int, default=8,
                   help="media fetch/decode/preprocess calls in flight")
    p.add_argument("--mm-per-request-timeout", type=float, default=30.0,
                   help="seconds one request's media work may take")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may run before it is ended")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="request bodies larger than this are refused with 413 (default 128 MiB)")
    p.add_argument("--max-queue-len", type=int, default=1024,
                   help="requests in flight before new ones are refused with 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests may still run before "
                        "they are ended (new ones are refused at once; vLLM's name)")
    p.add_argument("--reasoning-parser", default=None, help="accepted for vLLM scripts")
    p.add_argument("--tool-call-parser", default=None, help="accepted for vLLM scripts")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM scripts (tools are parsed when the model has them)")
    add_parallel_flags(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from glmv.demo import is_demo
    from glmv.server.launch import serve
    from glmv.server.options import serve_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.model = args.model_flag or args.model or "demo"
    if is_demo(args.model):
        print("glmv: serving the built-in demo model (RANDOM WEIGHTS: its answers are "
              "meaningless)", file=sys.stderr)
    return serve(serve_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv", description="GLM-V inference and serving")
    parser.add_argument("--version", action="version", version=f"glmv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_make_tiny(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GlmvError as exc:
        print(f"glmv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
