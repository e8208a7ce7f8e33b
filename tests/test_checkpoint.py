"""Model folders: resolving a path or a hub id (local Hugging Face cache first), the tensor list a
config implies, and the lazy safetensors reader (whole tensors, and regions of them cut like
torch tensors: only the region's bytes are read, FP8 regions dequantized with their blocks' scales).

The Hugging Face cache is faked in a temporary folder with the real layout
(`models--org--name/refs/main` + `snapshots/<commit>/...`); nothing touches the network:
huggingface_hub reads HF_HUB_CACHE once at import, so the tests patch its constants module too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

from glmv.checkpoint import (
    CheckpointReader,
    Fp8Blocks,
    dequantize_fp8,
    expected_tensors,
    resolve_model_path,
)
from glmv.config import ModelConfig
from glmv.errors import CheckpointError
from glmv.models.loader import load_model
from tests.conftest import VARIANTS, copy_checkpoint
from tests.models.test_loader import dequantize_reference

REPO_ID = "zai-org/GLM-Tiny-Test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD_BYTES = 300_000  # same spec as tests/test_checkpoint_writer.py


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: both the env and huggingface_hub's constants."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setenv(var, str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def add_to_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put `folder`'s files in the cache as the `main` snapshot of `repo_id`; returns it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


# --------------------------------------------------------------------------- resolve_model_path


def test_existing_folder_is_returned_as_is(tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint("glm-4.6v-flash")
    assert resolve_model_path(folder) == folder
    assert resolve_model_path(str(folder)) == folder


@pytest.mark.parametrize("model", ["/nonexistent/glm-model", "no/such/nested/folder",
                                   "./relative-missing", "C:\\models\\glm"])
def test_missing_folder_that_is_no_hub_id(model: str, hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        resolve_model_path(model)
    assert repr(model) in str(info.value)


def test_a_file_is_not_a_model_folder(tiny_checkpoint: Any) -> None:
    weights = tiny_checkpoint("glm-4.6v-flash") / "model.safetensors"
    with pytest.raises(CheckpointError, match="not a model folder") as info:
        resolve_model_path(weights)
    assert str(weights) in str(info.value)


def test_hub_id_resolves_from_the_local_cache(hub_cache: Path, tiny_checkpoint: Any) -> None:
    source = tiny_checkpoint("glm-4.5v")
    snapshot = add_to_cache(hub_cache, REPO_ID, source)
    path = resolve_model_path(REPO_ID)
    assert path.resolve() == snapshot.resolve()
    assert resolve_model_path(REPO_ID, allow_download=False).resolve() == snapshot.resolve()
    model = load_model(path, dtype="float32", progress=False)
    embed = load_file(str(source / "model.safetensors"))["model.language_model.embed_tokens.weight"]
    assert torch.equal(model.model.language_model.embed_tokens.weight, embed.float())


def test_hub_id_absent_from_the_cache_offline(hub_cache: Path, tiny_checkpoint: Any) -> None:
    add_to_cache(hub_cache, REPO_ID, tiny_checkpoint("glm-4.5v"))  # another repo is cached
    with pytest.raises(CheckpointError, match="cache") as info:
        resolve_model_path("zai-org/GLM-Not-Cached")
    message = str(info.value)
    assert "'zai-org/GLM-Not-Cached'" in message
    assert str(hub_cache) in message and "HF_HUB_OFFLINE" in message


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: empty cache, download gives `result`."""

    def __init__(self, result: Path | Exception) -> None:
        self.result = result
        self.downloads: list[str] = []

    def __call__(self, repo_id: str, *, local_files_only: bool = False, **kwargs: Any) -> str:
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        self.downloads.append(repo_id)
        if isinstance(self.result, Exception):
            raise self.result
        return str(self.result)


@pytest.mark.parametrize("offline, allow, downloads", [
    (None, None, True),    # online by default
    ("0", None, True),     # HF_HUB_OFFLINE=0 means online, as in huggingface_hub
    ("false", None, True),
    ("1", None, False),
    ("TRUE", None, False),
    ("1", True, True),     # an explicit allow_download wins
    (None, False, False),
])
def test_download_only_when_allowed(offline: str | None, allow: bool | None, downloads: bool,
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    if downloads:
        assert resolve_model_path(REPO_ID, allow_download=allow) == tmp_path
        assert fake.downloads == [REPO_ID]
    else:
        with pytest.raises(CheckpointError, match="downloads are off"):
            resolve_model_path(REPO_ID, allow_download=allow)
        assert fake.downloads == []


@pytest.mark.parametrize("error", [OSError("connection refused"), ValueError("bad repo id")])
def test_failed_download_is_a_checkpoint_error(error: Exception, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(error))
    with pytest.raises(CheckpointError, match="could not download") as info:
        resolve_model_path(REPO_ID, allow_download=True)
    assert REPO_ID in str(info.value) and str(error) in str(info.value)


# --------------------------------------------------------------------------- expected_tensors


@pytest.mark.parametrize("variant", VARIANTS)
def test_expected_tensors_match_the_published_names(variant: str, tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint(variant)
    cfg = ModelConfig.from_pretrained(folder)
    specs = expected_tensors(cfg)
    names = [name for name, _, _ in specs]
    assert len(names) == len(set(names))
    reader = CheckpointReader(folder)
    assert {name: shape for name, shape, _ in specs} == reader.shapes
    assert "lm_head.weight" in names
    if cfg.text.moe is not None:
        moe = cfg.text.moe
        experts = [n for n in names if ".mlp.experts." in n and n.endswith("down_proj.weight")]
        moe_layers = cfg.text.num_hidden_layers - moe.first_k_dense_replace
        assert len(experts) == moe.n_routed_experts * moe_layers
        assert dict((n, k) for n, _, k in specs)[
            "model.language_model.layers.1.mlp.gate.e_score_correction_bias"] == "route_bias"


def test_tied_config_expects_no_lm_head(tiny_checkpoint: Any) -> None:
    data = json.loads((tiny_checkpoint("glm-4.6v-flash") / "config.json").read_text())
    data["tie_word_embeddings"] = True
    names = [name for name, _, _ in expected_tensors(ModelConfig.from_dict(data))]
    assert "lm_head.weight" not in names and "model.language_model.embed_tokens.weight" in names


# --------------------------------------------------------------------------- CheckpointReader


def test_reader_reads_headers_then_tensors_lazily(tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint("glm-4.5v", fp8=True)
    reader = CheckpointReader(folder)
    assert reader.files == [folder / "model.safetensors"]
    assert reader._handles == {}  # constructing reads headers only
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert reader.dtypes[name] == "F8_E4M3"
    assert reader.dtypes[name.replace(".weight", ".weight_scale_inv")] == "F32"
    tensor = reader.get(name)
    assert tensor.dtype == torch.float8_e4m3fn and tuple(tensor.shape) == reader.shapes[name]
    assert reader.total_bytes == (folder / "model.safetensors").stat().st_size
    reader.close()


def test_reader_follows_the_index(tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    reader = CheckpointReader(folder)
    assert [f.name for f in reader.files] == sorted(set(index.values()))
    assert {n: p.name for n, p in reader.locations.items()} == index
    by_file = dict(reader.names_by_file())
    assert sum(len(v) for v in by_file.values()) == len(index)


def test_reader_ignores_stray_files_when_an_index_exists(tiny_checkpoint: Any,
                                                         tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES),
                             tmp_path / "ckpt")
    (folder / "consolidated.safetensors").write_bytes(b"junk")
    assert folder / "consolidated.safetensors" not in CheckpointReader(folder).files


@pytest.mark.parametrize("content", [b"", b"\x01\x00", b"\xff" * 8 + b"{}",
                                     (20).to_bytes(8, "little") + b'{"a": {"dtype": 1}}xxxx',
                                     (4).to_bytes(8, "little") + b"[1]x"])
def test_reader_rejects_bad_headers(content: bytes, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        CheckpointReader(tmp_path)


def test_reader_needs_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        CheckpointReader(tmp_path)


# --------------------------------------------------------------------------- LazyTensor

BLOCK = (32, 48)


@pytest.fixture(scope="module")
def tensor_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One safetensors file: a 3-D bf16 tensor and an FP8 weight [100, 130] whose 32x48 blocks
    do not divide it (edge blocks are partial), with its scales."""
    folder = tmp_path_factory.mktemp("lazy")
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "plain": torch.randn(10, 14, 6, generator=gen).to(torch.bfloat16),
        "fp8.weight": (torch.randn(100, 130, generator=gen) * 100).to(torch.float8_e4m3fn),
        "fp8.weight_scale_inv": torch.rand(4, 3, generator=gen) + 0.5,
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


def test_lazy_tensor_reads_nothing_until_materialized(tensor_file: Any) -> None:
    folder, tensors = tensor_file
    reader = CheckpointReader(folder)
    lazy = reader.lazy("plain").narrow(0, 2, 5).split([3, 11], dim=1)[1]
    assert lazy.shape == (5, 11, 6) and not reader.bytes_read and reader._handles == {}
    assert torch.equal(lazy.materialize(), tensors["plain"][2:7, 3:])
    assert reader.bytes_read == {"plain": 5 * 11 * 6 * 2}  # bf16: only the region's bytes


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_lazy_narrow_on_each_dim(dim: int, tensor_file: Any) -> None:
    folder, tensors = tensor_file
    reader = CheckpointReader(folder)
    got = reader.lazy("plain").narrow(dim, 1, 4)
    want = tensors["plain"].narrow(dim, 1, 4)
    assert got.shape == want.shape
    assert torch.equal(got.materialize(), want)
    assert reader.bytes_read["plain"] == want.numel() * 2


def test_lazy_chained_narrows_and_splits(tensor_file: Any) -> None:
    folder, tensors = tensor_file
    lazy, full = CheckpointReader(folder).lazy("plain"), tensors["plain"]
    got = lazy.narrow(0, 2, 7).narrow(1, 3, 9).narrow(0, 1, 4).narrow(2, 5, 1)
    assert torch.equal(got.materialize(), full.narrow(0, 2, 7).narrow(1, 3, 9)[1:5, :, 5:6])
    for dim, sizes in [(0, [3, 4, 3]), (1, [14]), (2, [1, 0, 5])]:
        pieces = lazy.narrow(1, 0, 14).split(sizes, dim)
        for piece, want in zip(pieces, full.split(sizes, dim), strict=True):
            assert torch.equal(piece.materialize(), want)
    whole = CheckpointReader(folder)
    assert torch.equal(whole.lazy("plain").materialize(), whole.get("plain"))


@pytest.mark.parametrize("cut", [lambda t: t.narrow(0, 8, 3), lambda t: t.narrow(3, 0, 1),
                                 lambda t: t.narrow(1, -1, 2), lambda t: t.narrow(1, 2, -1),
                                 lambda t: t.split([4, 4], 0)])
def test_lazy_cuts_outside_the_tensor_are_refused(cut: Any, tensor_file: Any) -> None:
    lazy = CheckpointReader(tensor_file[0]).lazy("plain")
    with pytest.raises((IndexError, ValueError), match="plain"):
        cut(lazy)


@pytest.mark.parametrize("rows, cols", [
    ((0, 100), (0, 130)),   # whole
    ((32, 64), (48, 96)),   # exactly one block
    ((5, 37), (50, 97)),    # unaligned on every side, across block edges
    ((40, 100), (0, 65)),   # into the partial last row block
    ((99, 100), (129, 130)),  # the last element alone
    ((0, 100), (47, 49)),   # two columns either side of a block edge
])
def test_lazy_fp8_region_is_the_dequantized_slice(rows: tuple[int, int], cols: tuple[int, int],
                                                  tensor_file: Any) -> None:
    folder, tensors = tensor_file
    reader = CheckpointReader(folder)
    lazy = reader.lazy("fp8.weight", Fp8Blocks("fp8.weight_scale_inv", BLOCK))
    got = lazy.narrow(0, rows[0], rows[1] - rows[0]).narrow(1, cols[0], cols[1] - cols[0])
    region = got.materialize()
    whole = dequantize_reference(tensors["fp8.weight"], tensors["fp8.weight_scale_inv"], BLOCK)
    assert region.dtype == torch.float32
    assert torch.equal(region, whole[rows[0]:rows[1], cols[0]:cols[1]])
    assert torch.equal(region, dequantize_fp8(tensors["fp8.weight"],
                                              tensors["fp8.weight_scale_inv"],
                                              BLOCK)[rows[0]:rows[1], cols[0]:cols[1]])
    # The region's fp8 bytes, and only the scales of the blocks it touches.
    touched = ((rows[1] - 1) // 32 - rows[0] // 32 + 1) * ((cols[1] - 1) // 48 - cols[0] // 48 + 1)
    assert reader.bytes_read == {"fp8.weight": (rows[1] - rows[0]) * (cols[1] - cols[0]),
                                 "fp8.weight_scale_inv": 4 * touched}


def test_lazy_read_of_a_damaged_file_is_a_checkpoint_error(tensor_file: Any,
                                                           tmp_path: Path) -> None:
    data = (tensor_file[0] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])  # header intact
    lazy = CheckpointReader(tmp_path).lazy("plain").narrow(0, 0, 1)
    with pytest.raises(CheckpointError, match="plain"):
        lazy.materialize()
