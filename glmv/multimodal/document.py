"""Documents (PDF; PPT/PPTX through LibreOffice) as page images, in page order.

    {"type": "file", "file": {...}} --bytes--> sniff --PPT/PPTX: soffice --convert-to pdf-->
    PDF --PyMuPDF: page count, encryption--> one resolution for all pages --> RGB page images

The processor puts the page images in place of the file part, so the chat template renders them
as images. The resolution is the highest (at most MAX_DPI) at which all pages together stay
within the document's visual-token budget, counted the way the image processor will resize each
page; a page is never rendered larger than the processor would keep (`max_page_pixels`).

PyMuPDF is not thread-safe, so all PDF work holds one lock. No torch here.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from glmv.errors import GlmvError, MediaError, MediaTooLargeError
from glmv.multimodal.sniff import PPT, PPTX, MediaFormat

#: Highest rendering resolution, in dots per inch (a page of 8.27 x 11.69 in = 1191 x 1684 px).
MAX_DPI = 144.0
#: Content-part types that carry a document.
DOCUMENT_PART_TYPES = ("file", "input_file")
OFFICE_MISSING = "PPT/PPTX needs LibreOffice (soffice) on the server; install it or send a PDF"

# (height, width) of a page image -> the visual tokens the image processor gives it.
TokensForSize = Callable[[int, int], int]

_PDF_LOCK = threading.Lock()
_POINTS_PER_INCH = 72.0


@dataclass(frozen=True)
class DocumentLimits:
    """How much of a document is rendered, and how large."""

    max_pages: int  # more pages: MediaTooLargeError (--max-document-pages)
    max_visual_tokens: int  # all pages together, after the processor's resize
    max_page_pixels: int  # a page image larger than this would only be shrunk again
    max_dpi: float = MAX_DPI
    office_timeout_s: float = 60.0  # seconds LibreOffice may take to convert PPT/PPTX


@dataclass(frozen=True)
class DocumentSource:
    """Where a file content part's document comes from: a URL (http(s), file://, data:) or
    base64 data (raw, or a data URL)."""

    url: str | None
    base64_data: str | None
    filename: str | None  # informational only: the format comes from the bytes


def document_source(part: Mapping[str, Any]) -> DocumentSource:
    """The source of a `{"type": "file", "file": {...}}` part (OpenAI's shape: `file_data` +
    `filename`; glmv's: `url`) or of a Responses-API `input_file` part (keys at the top level)."""
    body = part.get("file") if part.get("type") == "file" else part
    if not isinstance(body, Mapping):
        raise MediaError('a file content part needs an object: {"type": "file", "file": '
                         '{"file_data": "<base64 or data URL>", "filename": "x.pdf"}} or '
                         '{"file": {"url": "https://..."}}')
    data = body.get("file_data")
    url = body.get("url", body.get("file_url"))
    filename = body.get("filename")
    if data is None and url is None:
        if body.get("file_id") is not None:
            raise MediaError("file_id needs an OpenAI Files API, which glmv does not have; send "
                             "the document as file_data (base64) or url")
        raise MediaError("file content part has no source (expected file_data or url)")
    if data is not None and url is not None:
        raise MediaError("file content part has both file_data and url; send one")
    for name, value in (("file_data", data), ("url", url)):
        if value is not None and not isinstance(value, str):
            raise MediaError(f"file content part: {name} must be a string")
    return DocumentSource(url=url, base64_data=data,
                          filename=filename if isinstance(filename, str) else None)


def document_pages(data: bytes, fmt: MediaFormat, limits: DocumentLimits,
                   tokens_for_size: TokensForSize) -> list[PIL.Image.Image]:
    """Page images (RGB) of a sniffed document, in page order, within `limits`."""
    if fmt in (PPT, PPTX):
        data = office_to_pdf(data, fmt, limits.office_timeout_s)
    return pdf_pages(data, limits, tokens_for_size)


# ---------------------------------------------------------------------------------- PDF


def pdf_pages(data: bytes, limits: DocumentLimits,
              tokens_for_size: TokensForSize) -> list[PIL.Image.Image]:
    """Render every page of a PDF at the resolution `choose_zoom` picks."""
    import pymupdf

    with _PDF_LOCK:
        pymupdf.TOOLS.mupdf_display_errors(False)  # errors become exceptions, not stderr noise
        try:
            try:
                doc = pymupdf.open(stream=data, filetype="pdf")
            except Exception as exc:  # FileDataError and friends from a damaged file
                raise MediaError(f"cannot read the PDF: the data is damaged ({exc})") from exc
            with doc:
                return _render(doc, limits, tokens_for_size)
        finally:
            pymupdf.TOOLS.reset_mupdf_warnings()  # MuPDF keeps them until told; a server runs long


def _render(doc: Any, limits: DocumentLimits,
            tokens_for_size: TokensForSize) -> list[PIL.Image.Image]:
    import pymupdf

    if doc.needs_pass:
        raise MediaError("the PDF is encrypted (password-protected); send it without a password")
    num_pages = doc.page_count
    if num_pages == 0:
        raise MediaError("the PDF has no pages (or is too damaged to read)")
    if num_pages > limits.max_pages:
        raise MediaTooLargeError(f"the document has {num_pages} pages, more than the limit of "
                                 f"{limits.max_pages} (--max-document-pages)")
    try:
        sizes = [(page.rect.width, page.rect.height) for page in doc]  # points, rotation applied
        zooms = choose_zoom(sizes, limits, tokens_for_size)
        images = []
        for page, zoom in zip(doc, zooms, strict=True):
            pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False,
                                     colorspace=pymupdf.csRGB)
            image = PIL.Image.frombuffer("RGB", (pixmap.width, pixmap.height), pixmap.samples,
                                         "raw", "RGB", pixmap.stride, 1)
            images.append(image.copy())  # own the pixels; the pixmap is freed
    except GlmvError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot render the PDF: {type(exc).__name__}: {exc}") from exc
    return images


def page_pixels(width_pt: float, height_pt: float, zoom: float) -> tuple[int, int]:
    """(height, width) in pixels of a page rendered at `zoom` (pixels per point), as PyMuPDF
    sizes the pixmap: the integer rectangle covering the scaled page."""
    import pymupdf

    rect = pymupdf.Rect(0, 0, width_pt, height_pt) * pymupdf.Matrix(zoom, zoom)
    box = rect.irect
    return max(box.height, 1), max(box.width, 1)


def choose_zoom(sizes: Sequence[tuple[float, float]], limits: DocumentLimits,
                tokens_for_size: TokensForSize) -> list[float]:
    """Zoom (pixels per point) of each page: one resolution for the whole document, the highest
    up to `max_dpi` at which the pages' tokens add up to at most `max_visual_tokens`; a page
    whose image would pass `max_page_pixels` is rendered smaller (the processor would shrink it).
    """
    for number, (width, height) in enumerate(sizes, start=1):
        if not (width > 0 and height > 0 and math.isfinite(width * height)):
            raise MediaError(f"page {number} of the PDF has no area ({width} x {height} points)")
    caps = [math.sqrt(limits.max_page_pixels / (w * h)) for w, h in sizes]

    def zooms(zoom: float) -> list[float]:
        return [min(zoom, cap) for cap in caps]

    def tokens(zoom: float) -> int:
        total = 0
        for (width, height), page_zoom in zip(sizes, zooms(zoom), strict=True):
            total += tokens_for_size(*page_pixels(width, height, page_zoom))
        return total

    high = limits.max_dpi / _POINTS_PER_INCH
    if tokens(high) <= limits.max_visual_tokens:
        return zooms(high)
    low = 1.0 / _POINTS_PER_INCH  # 1 dpi; the processor scales tiny pages up to its minimum
    fewest = tokens(low)
    if fewest > limits.max_visual_tokens:
        raise MediaTooLargeError(
            f"the document's {len(sizes)} pages need at least {fewest} visual tokens, more than "
            f"the limit of {limits.max_visual_tokens} per document "
            "(--document-max-visual-tokens); send fewer pages")
    for _ in range(40):  # bisection: `low` always fits, `high` never does
        middle = (low + high) / 2
        if tokens(middle) <= limits.max_visual_tokens:
            low = middle
        else:
            high = middle
    return zooms(low)


# ---------------------------------------------------------------------------------- office


def office_binary() -> str | None:
    """LibreOffice's command on PATH (`soffice` or `libreoffice`), or None."""
    return shutil.which("soffice") or shutil.which("libreoffice")


def office_to_pdf(data: bytes, fmt: MediaFormat, timeout_s: float) -> bytes:
    """A PPT/PPTX converted to PDF by headless LibreOffice, in a private temporary folder.

    Each conversion has its own LibreOffice profile, so conversions can run side by side; one
    that takes longer than `timeout_s` is killed with its whole process group.
    """
    binary = office_binary()
    if binary is None:
        raise MediaError(OFFICE_MISSING)
    with tempfile.TemporaryDirectory(prefix="glmv-office-") as tmp:
        folder = Path(tmp)  # created 0700: private to this process's user
        source = folder / f"document.{fmt.name.lower()}"
        source.write_bytes(data)
        command = [binary, f"-env:UserInstallation={(folder / 'profile').as_uri()}",
                   "--headless", "--norestore", "--nolockcheck", "--nodefault", "--nologo",
                   "--convert-to", "pdf", "--outdir", str(folder / "out"), str(source)]
        output = _run(command, folder, timeout_s, fmt)
        result = folder / "out" / "document.pdf"
        if not result.is_file():
            raise MediaError(f"LibreOffice could not convert the {fmt.name} to PDF "
                             f"({output[-300:].strip() or 'no output'}); send a PDF instead")
        return result.read_bytes()


def _run(command: list[str], folder: Path, timeout_s: float, fmt: MediaFormat) -> str:
    env = {**os.environ, "HOME": str(folder)}  # nothing written to the server user's home
    process = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own group: killed as a whole
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)  # not reaped yet: the group id is still this conversion's
        process.communicate()
        raise MediaError(f"converting the {fmt.name} to PDF took longer than {timeout_s:g} s; "
                         "send a PDF instead") from None
    return out.decode("utf-8", "replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
