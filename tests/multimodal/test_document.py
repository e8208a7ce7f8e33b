"""Documents as page images: PDF (PyMuPDF) and PPT/PPTX (LibreOffice, or a fake `soffice` that
stands in for it), page count and token budget, damaged and encrypted files, the part shapes."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from glmv.errors import ImageError, MediaError, MediaTooLargeError
from glmv.multimodal import document
from glmv.multimodal.document import MAX_DPI, OFFICE_MISSING, DocumentLimits, choose_zoom
from glmv.multimodal.image import image_num_tokens
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor
from tests.multimodal.media_helpers import data_url, make_pdf, minimal_pptx, processor

A4 = (595.0, 842.0)  # points
RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
# Portrait, landscape, small.
THREE_PAGES = [(*A4, RED), (842.0, 595.0, GREEN), (300.0, 200.0, BLUE)]


@pytest.fixture
def make(tiny_checkpoint: Callable[..., Path],
         tmp_path: Path) -> Callable[..., MultiModalProcessor]:
    def build(**fields: Any) -> MultiModalProcessor:
        policy = MediaPolicy(allowed_local_paths=(str(tmp_path),), **fields)
        return processor(tiny_checkpoint("glm-4.6v"), policy)

    return build


def file_part(**file: Any) -> dict[str, Any]:
    return {"type": "file", "file": file}


def chat(proc: MultiModalProcessor, *parts: dict[str, Any]) -> Any:
    return proc.process_chat([{"role": "user", "content": [
        {"type": "text", "text": "Before."}, *parts, {"type": "text", "text": "After."}]}])


def page_colors(result: Any) -> list[str]:
    """The dominant colour of each image item (from its normalised pixels)."""
    names = []
    for item in result.mm_items:
        channels = item.pixel_values.reshape(-1, 3, 2 * 14 * 14).mean(dim=(0, 2))
        names.append("RGB"[int(channels.argmax())])
    return names


def test_pdf_pages_become_images_in_order(make: Callable[..., MultiModalProcessor],
                                          tmp_path: Path) -> None:
    proc = make()
    result = chat(proc, file_part(file_data=data_url(make_pdf(THREE_PAGES), "application/pdf"),
                                  filename="report.pdf"))
    assert [item.modality for item in result.mm_items] == ["image"] * 3
    assert page_colors(result) == ["R", "G", "B"]
    # Portrait, landscape, small: the page shapes survive.
    sizes = [item.original_size for item in result.mm_items]
    assert sizes[0][0] > sizes[0][1] and sizes[1][0] < sizes[1][1] and sizes[2][0] < sizes[0][0]
    # At most 144 dpi: an A4 page is 1191 x 1684 pixels.
    assert sizes[0] == (round(842 * MAX_DPI / 72), round(595 * MAX_DPI / 72))
    text = proc.tokenizer.decode(result.token_ids)
    assert text.index("Before.") < text.index("<|image|>") < text.index("After.")
    assert text.count("<|begin_of_image|>") == 3


def test_every_file_part_shape(make: Callable[..., MultiModalProcessor], tmp_path: Path) -> None:
    proc = make()
    pdf = make_pdf([(200.0, 300.0, RED), (300.0, 200.0, GREEN), (100.0, 100.0, BLUE)])
    path = tmp_path / "report.bin"  # the name does not matter
    path.write_bytes(pdf)
    encoded = base64.b64encode(pdf).decode()
    shapes = [file_part(file_data=data_url(pdf, "application/pdf"), filename="report.pdf"),
              file_part(file_data=encoded, filename="report.pdf"),  # raw base64 (OpenAI)
              file_part(file_data=data_url(pdf, "image/png")),  # a lying MIME type
              file_part(url=data_url(pdf)), file_part(url=path.as_uri()), file_part(url=str(path)),
              {"type": "input_file", "file_data": encoded, "filename": "report.pdf"}]
    results = [chat(proc, part) for part in shapes]
    assert page_colors(results[0]) == ["R", "G", "B"]
    for other in results[1:]:
        assert other.token_ids == results[0].token_ids
        assert [i.content_hash for i in other.mm_items] == [
            i.content_hash for i in results[0].mm_items]


def test_pages_fit_the_visual_token_budget(make: Callable[..., MultiModalProcessor]) -> None:
    pdf = data_url(make_pdf(THREE_PAGES))
    roomy = chat(make(), file_part(file_data=pdf))
    budget = 600
    tight = chat(make(document_max_visual_tokens=budget), file_part(file_data=pdf))
    total = sum(item.num_embeds for item in tight.mm_items)
    assert total <= budget < sum(item.num_embeds for item in roomy.mm_items)
    assert total > budget * 0.8  # the highest resolution that fits, not much less
    assert page_colors(tight) == ["R", "G", "B"]
    # Every page is scaled alike: the same pixels per point on all pages.
    scales = [item.original_size[1] / width for item, (width, _, _) in
              zip(tight.mm_items, THREE_PAGES, strict=True)]
    assert max(scales) - min(scales) < 0.02


def test_choose_zoom_caps_huge_pages(make: Callable[..., MultiModalProcessor]) -> None:
    config = make().image_config
    limits = DocumentLimits(max_pages=4, max_visual_tokens=100_000, max_page_pixels=4_000_000)
    zooms = choose_zoom([(14400.0, 14400.0), A4], limits,
                        lambda h, w: image_num_tokens(h, w, config))
    assert zooms[1] == MAX_DPI / 72
    assert 14400 * zooms[0] * 14400 * zooms[0] <= 4_000_000 * 1.001


def test_too_many_pages(make: Callable[..., MultiModalProcessor]) -> None:
    pdf = data_url(make_pdf(THREE_PAGES))
    assert len(chat(make(max_document_pages=3), file_part(file_data=pdf)).mm_items) == 3
    with pytest.raises(MediaTooLargeError, match="3 pages, more than the limit of 2") as info:
        chat(make(max_document_pages=2), file_part(file_data=pdf))
    assert "--max-document-pages" in str(info.value) and info.value.http_status == 413


def test_budget_too_small_for_the_pages(make: Callable[..., MultiModalProcessor]) -> None:
    with pytest.raises(MediaTooLargeError, match="--document-max-visual-tokens"):
        chat(make(document_max_visual_tokens=5), file_part(file_data=data_url(make_pdf(
            THREE_PAGES))))


def test_encrypted_pdf(make: Callable[..., MultiModalProcessor]) -> None:
    import pymupdf

    locked = make_pdf([(*A4, RED)], encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret",
                      owner_pw="owner")
    with pytest.raises(MediaError, match="encrypted") as info:
        chat(make(), file_part(file_data=data_url(locked), filename="locked.pdf"))
    assert "locked.pdf" in str(info.value)
    # Permissions only (no password to open it): readable, so rendered.
    restricted = make_pdf([(*A4, RED)], encryption=pymupdf.PDF_ENCRYPT_AES_256,
                          owner_pw="owner", permissions=0)
    assert len(chat(make(), file_part(file_data=data_url(restricted))).mm_items) == 1


@pytest.mark.parametrize("data", [b"%PDF-1.7\n" + b"\x00garbage" * 50, b"%PDF-1.4\n%%EOF\n"])
def test_damaged_pdf(make: Callable[..., MultiModalProcessor], data: bytes) -> None:
    with pytest.raises(MediaError, match="PDF"):
        chat(make(), file_part(file_data=data_url(data)))


def test_truncated_pdf(make: Callable[..., MultiModalProcessor]) -> None:
    pdf = make_pdf(THREE_PAGES)
    try:
        result = chat(make(), file_part(file_data=data_url(pdf[: len(pdf) // 2])))
    except MediaError:
        return  # refused: fine
    assert 1 <= len(result.mm_items) <= 3  # or repaired by MuPDF: what it recovered


def test_pdf_in_an_image_part(make: Callable[..., MultiModalProcessor]) -> None:
    with pytest.raises(ImageError, match="holds a PDF document, not an image"):
        chat(make(), {"type": "image_url", "image_url": {"url": data_url(make_pdf(THREE_PAGES))}})


def test_image_in_a_file_part(make: Callable[..., MultiModalProcessor]) -> None:
    from tests.multimodal.media_helpers import encode, picture

    with pytest.raises(MediaError, match=r"holds a PNG image, not a document.*image_url parts"):
        chat(make(), file_part(file_data=data_url(encode(picture(), "PNG"))))


@pytest.mark.parametrize(("part", "match"), [
    ({"type": "file", "file": {"file_id": "file-abc"}}, "file_id needs an OpenAI Files API"),
    ({"type": "file", "file": {"filename": "x.pdf"}}, "has no source"),
    ({"type": "file", "file": "x.pdf"}, "needs an object"),
    ({"type": "file", "file": {"file_data": "AAAA", "url": "https://x/y.pdf"}}, "send one"),
    ({"type": "file", "file": {"file_data": 12}}, "file_data must be a string"),
    ({"type": "file", "file": {"file_data": "/etc/passwd"}}, "not valid base64"),
])
def test_bad_file_parts(make: Callable[..., MultiModalProcessor], part: dict[str, Any],
                        match: str) -> None:
    with pytest.raises(MediaError, match=match):
        chat(make(), part)


def test_file_url_follows_the_local_rules(make: Callable[..., MultiModalProcessor],
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside") / "doc.pdf"
    outside.write_bytes(make_pdf([(*A4, RED)]))
    with pytest.raises(MediaError, match="outside the allowed media folders"):
        chat(make(), file_part(url=outside.as_uri()))
    with pytest.raises(MediaError, match="byte limit"):
        chat(make(max_bytes=100), file_part(file_data=data_url(make_pdf([(*A4, RED)]))))


# ------------------------------------------------------------------ PPT / PPTX


def test_pptx_without_libreoffice(make: Callable[..., MultiModalProcessor],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(document, "office_binary", lambda: None)
    for data in (minimal_pptx(), b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64)
                 + "PowerPoint Document".encode("utf-16-le")):
        with pytest.raises(MediaError, match="PPT/PPTX needs LibreOffice") as info:
            chat(make(), file_part(file_data=data_url(data), filename="slides.pptx"))
        assert OFFICE_MISSING in str(info.value)


def fake_soffice(folder: Path, script: str) -> None:
    """A `soffice` on PATH running `script` (bash) with LibreOffice's arguments."""
    folder.mkdir()
    binary = folder / "soffice"
    binary.write_text("#!/bin/bash\n" + script)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(shutil.which("bash") is None, reason="the fake soffice is a bash script")
def test_conversion_plumbing_with_a_fake_soffice(make: Callable[..., MultiModalProcessor],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Copies a prepared PDF to --outdir as LibreOffice would; records its arguments.
    prepared = tmp_path / "prepared.pdf"
    prepared.write_bytes(make_pdf([(*A4, GREEN), (*A4, BLUE)]))
    fake_soffice(tmp_path / "bin", f"""
echo "$@" > {tmp_path}/args
while [ $# -gt 0 ]; do
  case "$1" in --outdir) out="$2"; shift;; *) last="$1";; esac; shift
done
mkdir -p "$out" && cp {prepared} "$out/$(basename "${{last%.*}}").pdf"
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = chat(make(), file_part(file_data=data_url(minimal_pptx()), filename="deck.pptx"))
    assert page_colors(result) == ["G", "B"]
    args = (tmp_path / "args").read_text()
    assert "--headless" in args and "--convert-to pdf" in args
    assert "-env:UserInstallation=file://" in args  # a private profile per conversion


@pytest.mark.skipif(shutil.which("bash") is None, reason="the fake soffice is a bash script")
def test_conversion_timeout_and_failure(make: Callable[..., MultiModalProcessor], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_soffice(tmp_path / "slow", "sleep 30 & wait\n")
    fake_soffice(tmp_path / "broken", "echo 'Error: source file could not be loaded' >&2\n")
    part = file_part(file_data=data_url(minimal_pptx()))
    monkeypatch.setenv("PATH", f"{tmp_path / 'slow'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(MediaError, match=r"took longer than 0\.3 s"):
        chat(make(office_timeout_s=0.3), part)
    monkeypatch.setenv("PATH", f"{tmp_path / 'broken'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(MediaError, match=r"could not be loaded.*send a PDF instead"):
        chat(make(), part)


FLAT_ODP = """<?xml version="1.0" encoding="UTF-8"?>
<office:document xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"
 xmlns:draw="urn:oasis:names:tc:opendocument:xmlns:drawing:1.0"
 xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"
 xmlns:svg="urn:oasis:names:tc:opendocument:xmlns:svg-compatible:1.0" office:version="1.2"
 office:mimetype="application/vnd.oasis.opendocument.presentation">
 <office:body><office:presentation>
  <draw:page draw:name="one"><draw:frame svg:x="2cm" svg:y="2cm" svg:width="12cm"
   svg:height="3cm"><draw:text-box><text:p>First slide</text:p></draw:text-box></draw:frame>
  </draw:page>
  <draw:page draw:name="two"><draw:frame svg:x="2cm" svg:y="2cm" svg:width="12cm"
   svg:height="3cm"><draw:text-box><text:p>Second slide</text:p></draw:text-box></draw:frame>
  </draw:page>
 </office:presentation></office:body></office:document>
"""


@pytest.mark.skipif(document.office_binary() is None,
                    reason="LibreOffice (soffice) is not installed: PPTX conversion untested here")
def test_real_pptx_conversion(make: Callable[..., MultiModalProcessor], tmp_path: Path) -> None:
    source = tmp_path / "deck.fodp"
    source.write_text(FLAT_ODP)
    binary = document.office_binary()
    assert binary is not None
    subprocess.run([binary, f"-env:UserInstallation={(tmp_path / 'profile').as_uri()}",
                    "--headless", "--convert-to", "pptx", "--outdir", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=120)
    pptx = (tmp_path / "deck.pptx").read_bytes()
    result = chat(make(), file_part(file_data=data_url(pptx), filename="deck.pptx"))
    assert len(result.mm_items) == 2
    with pytest.raises(MediaError, match="could not convert"):  # a ZIP that is no presentation
        chat(make(), file_part(file_data=data_url(minimal_pptx())))


def test_pages_are_plain_rgb(make: Callable[..., MultiModalProcessor]) -> None:
    proc = make()
    pages = proc.load_document(file_part(file_data=data_url(make_pdf([(100.0, 50.0, RED)]))))
    (page,) = pages
    assert page.mode == "RGB" and page.size == (200, 100)  # 144 dpi
    assert np.asarray(page)[50, 150].tolist() == [255, 0, 0]
