"""`glmv make-tiny` and `glmv generate`, run in-process through `glmv.cli.main`.

Every bad input must end as one "glmv: error: ..." line with exit status 2 (or argparse's own
usage error), never a traceback. The demo checkpoint is written once into a temporary
GLMV_CACHE_DIR shared by this module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants

import glmv
from glmv.checkpoint import CheckpointReader
from glmv.cli import main
from glmv.models.glm4v_moe import Glm4vMoeForConditionalGeneration
from glmv.models.loader import load_model
from tests.conftest import copy_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HOUSE = ROOT / "examples" / "house.png"
SUMMARY = re.compile(r"glmv: (\d+) prompt tokens \((\d+) image, (\d+) video\), (\d+) generated "
                     r"in [\d.]+s, finish_reason=(\w+)")


@pytest.fixture(scope="module")
def glmv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("glmv-cache")


@pytest.fixture(autouse=True)
def _use_cache(glmv_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMV_CACHE_DIR", str(glmv_cache))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    image_tokens: int
    video_tokens: int
    num_generated: int
    finish_reason: str
    stderr: str


def generate(capsys: pytest.CaptureFixture[str], *argv: str, small_cache: bool = True
             ) -> Generated:
    """`glmv generate ARGV` must succeed; its stdout text and stderr summary, parsed.

    small_cache: a 50 MiB KV cache instead of the 1 GiB default (zeroing it dominates the run).
    """
    flags = ["--kv-cache-memory", "0.05"] if small_cache else []
    code, out, err = run(capsys, "generate", *argv, *flags)
    assert code == 0, err
    assert "Traceback" not in err
    match = SUMMARY.search(err)
    assert match, err
    prompt, image, video, count = (int(g) for g in match.groups()[:4])
    assert out.endswith("\n")
    return Generated(out[:-1], prompt, image, video, count, match[5], err)


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command that must fail with a glmv error; returns its error line."""
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("glmv: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command argparse must refuse (exit status 2, usage on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- make-tiny


def test_make_tiny_writes_the_fixture_checkpoint(tmp_path: Path, tiny_checkpoint: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny"
    code, stdout, _ = run(capsys, "make-tiny", str(out), "--variant", "glm-4.5v")
    assert code == 0
    assert "RANDOM WEIGHTS" in stdout and str(out) in stdout
    ref = tiny_checkpoint("glm-4.5v")  # size tiny, seed 0, bfloat16: the CLI defaults
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    model = load_model(out, progress=False)
    assert isinstance(model, Glm4vMoeForConditionalGeneration)


def test_make_tiny_fp8(tmp_path: Path, tiny_checkpoint: Any,
                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fp8"
    assert run(capsys, "make-tiny", str(out), "--variant", "glm-4.5v", "--fp8")[0] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    dtypes = CheckpointReader(out).dtypes
    assert "F8_E4M3" in dtypes.values()
    assert any(name.endswith(".weight_scale_inv") for name in dtypes)
    ref = tiny_checkpoint("glm-4.5v", fp8=True)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    load_model(out, progress=False)


def test_make_tiny_sharded(tmp_path: Path, tiny_checkpoint: Any,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sharded"
    args = ("make-tiny", str(out), "--variant", "glm-4.5v", "--max-shard-size", "1MB")
    assert run(capsys, *args)[0] == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert all(p.stat().st_size <= 1024**2 + 64 * 1024 for p in shards)  # 1 MiB + header
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in shards}
    got = dict(load_model(out, dtype="float32", progress=False).named_parameters())
    ref = dict(load_model(tiny_checkpoint("glm-4.5v"), dtype="float32",
                          progress=False).named_parameters())
    assert set(got) == set(ref)
    assert all(torch.equal(got[name], ref[name]) for name in ref)


def test_make_tiny_seed_and_dtype(tmp_path: Path, tiny_checkpoint: Any,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seeded"
    args = ("make-tiny", str(out), "--variant", "glm-4.6v-flash", "--seed", "1", "--dtype",
            "float32")
    assert run(capsys, *args)[0] == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    name = "model.language_model.embed_tokens.weight"
    mine = CheckpointReader(out)
    ref = CheckpointReader(tiny_checkpoint("glm-4.6v-flash"))
    assert mine.dtypes[name] == "F32"
    assert not torch.equal(mine.get(name).float(), ref.get(name).float())


@pytest.mark.parametrize("flags, mentions", [
    (["--variant", "glm-4.5v", "--size", "huge"], "invalid choice: 'huge'"),
    (["--variant", "glm-5v"], "invalid choice: 'glm-5v'"),
    (["--variant", "glm-4.5v", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["--variant", "glm-4.5v", "--max-shard-size", "lots"], "'lots' is not a size"),
    ([], "--variant"),
])
def test_make_tiny_usage_errors(flags: list[str], mentions: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "make-tiny", str(tmp_path / "out"), *flags)
    assert mentions in err
    assert not (tmp_path / "out").exists()


def test_make_tiny_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "make-tiny", str(tmp_path / "a"), "--variant", "glm-4.5v",
                 "--max-shard-size", "0")
    assert "max_shard_bytes" in line
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    line = fails(capsys, "make-tiny", str(a_file), "--variant", "glm-4.5v")
    assert str(a_file) in line


# --------------------------------------------------------------------------- generate


def test_generate_with_the_demo_model(glmv_cache: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    result = generate(capsys, "--prompt", "Describe a sunny day.", "--max-tokens", "8",
                      small_cache=False)
    assert "RANDOM WEIGHTS" in result.stderr
    assert result.text.strip()
    assert result.prompt_tokens > 5
    assert (result.image_tokens, result.video_tokens) == (0, 0)
    assert 1 <= result.num_generated <= 8
    assert list(glmv_cache.glob("demo-glm-4.6v-flash-tiny-v*/model.safetensors"))


def test_generate_with_an_image(capsys: pytest.CaptureFixture[str]) -> None:
    text_only = generate(capsys, "--prompt", "What is this?", "--max-tokens", "2")
    result = generate(capsys, "--prompt", "What is this?", "--image", str(HOUSE),
                      "--max-tokens", "2")
    assert result.image_tokens > 0 and result.video_tokens == 0
    # The image adds its placeholder tokens plus begin/end-of-image markers.
    assert result.prompt_tokens >= text_only.prompt_tokens + result.image_tokens


def test_generate_with_another_demo_variant(glmv_cache: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    result = generate(capsys, "--model", "demo:glm-4.1v-thinking", "--prompt", "Hello",
                      "--max-tokens", "4")
    assert "RANDOM WEIGHTS" in result.stderr
    assert list(glmv_cache.glob("demo-glm-4.1v-thinking-tiny-v*/model.safetensors"))


def test_max_tokens_is_exact(capsys: pytest.CaptureFixture[str]) -> None:
    result = generate(capsys, "--prompt", "Count to ten.", "--max-tokens", "3")
    assert (result.num_generated, result.finish_reason) == (3, "length")


def test_generate_int8(capsys: pytest.CaptureFixture[str]) -> None:
    result = generate(capsys, "--prompt", "Count to ten.", "--max-tokens", "3", "--dtype",
                      "bfloat16", "--quantization", "int8")
    assert (result.num_generated, result.finish_reason) == (3, "length")


def test_int8_in_float32_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    error = fails(capsys, "generate", "--prompt", "Hi", "--dtype", "float32",
                  "--quantization", "int8")
    assert "--quantization int8 computes in bfloat16" in error


def test_system_and_thinking_flags_change_the_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    base = generate(capsys, "--prompt", "Hi", "--max-tokens", "1").prompt_tokens
    system = generate(capsys, "--prompt", "Hi", "--system", "You are terse.", "--max-tokens", "1")
    no_think = generate(capsys, "--prompt", "Hi", "--no-thinking", "--max-tokens", "1")
    assert system.prompt_tokens > base
    assert no_think.prompt_tokens != base


def test_greedy_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--prompt", "Tell me about the city.", "--max-tokens", "12")
    first, second = generate(capsys, *args), generate(capsys, *args)
    assert first.text == second.text and first.num_generated == second.num_generated


def test_sampling_follows_the_seed(capsys: pytest.CaptureFixture[str]) -> None:
    def sample(seed: int) -> tuple[str, int]:
        result = generate(capsys, "--prompt", "Write a story.", "--max-tokens", "10",
                          "--temperature", "0.8", "--seed", str(seed))
        return result.text, result.num_generated

    first = sample(1)
    assert sample(1) == first
    # Random weights give near-uniform distributions: distinct seeds almost surely differ.
    outputs = {first, *(sample(seed) for seed in (2, 3, 4))}
    assert len(outputs) >= 3


# --------------------------------------------------------------------------- generate errors


def test_missing_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.png"
    line = fails(capsys, "generate", "--prompt", "x", "--image", str(missing))
    assert str(missing) in line


def test_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(bytes(range(256)) * 4)
    line = fails(capsys, "generate", "--prompt", "x", "--image", str(garbage))
    assert "image" in line.lower()


def test_missing_model_folder(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "generate", "--model", "/nonexistent", "--prompt", "x")
    assert "/nonexistent" in line


def test_unknown_model_type(tmp_path: Path, tiny_checkpoint: Any,
                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen2_vl"
    (folder / "config.json").write_text(json.dumps(config))
    line = fails(capsys, "generate", "--model", str(folder), "--prompt", "x")
    assert "qwen2_vl" in line


def test_unknown_demo_variant(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "generate", "--model", "demo:glm-9v", "--prompt", "x")
    assert "glm-9v" in line and "glm-4.6v-flash" in line


@pytest.mark.parametrize("flags, mentions", [
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "-4"], "--max-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "0.8", "--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["--device", "nonsense"], "nonsense"),
])
def test_bad_generate_values(flags: list[str], mentions: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert mentions in fails(capsys, "generate", "--prompt", "x", *flags)


def test_unavailable_cuda_device(capsys: pytest.CaptureFixture[str]) -> None:
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or cuda:0 on CPU
    assert device in fails(capsys, "generate", "--prompt", "x", "--device", device)


def test_generate_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--prompt" in usage_error(capsys, "generate")
    assert "invalid choice: 'int4'" in usage_error(capsys, "generate", "--prompt", "x",
                                                   "--dtype", "int4")


def test_generate_from_a_hub_id_in_the_local_cache(tmp_path: Path, tiny_checkpoint: Any,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--zai-org--GLM-Tiny-CLI"
    commit = "f" * 40
    shutil.copytree(tiny_checkpoint("glm-4.6v-flash"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = generate(capsys, "--model", "zai-org/GLM-Tiny-CLI", "--prompt", "Hi",
                      "--max-tokens", "2")
    assert result.num_generated >= 1 and "demo model" not in result.stderr
    line = fails(capsys, "generate", "--model", "zai-org/Not-Cached", "--prompt", "x")
    assert "zai-org/Not-Cached" in line and "cache" in line


# --------------------------------------------------------------------------- --version


def test_version_from_python_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "glmv", "--version"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"glmv {glmv.__version__}"

