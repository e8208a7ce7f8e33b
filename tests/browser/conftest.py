"""The chat page (glmv/server/static) in headless chromium, against real `glmv serve` processes.

Two servers are shared by the whole folder: `server` (glm-4.6v, `--max-media-bytes 20000`, so
both a small image and an oversized one can be tried on it) and `key_server` (`--api-key`).
`page` is a fresh browser page (its own context: empty sessionStorage) on `server`'s `/`.
Everything here skips, saying why, when playwright or a chromium binary is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server, stop_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
#: The server's byte limit per media item in these tests.
MAX_MEDIA_BYTES = 20000
API_KEY = "sk-page-test"
_HERE = Path(__file__).parent


def chromium_path() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def _skip_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if chromium_path() is None:
        return ("no chromium binary (neither /usr/bin/chromium nor chromium on PATH; "
                "apt-get install chromium)")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=f"chat page tests: {reason}"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope, not session: Playwright's sync API keeps an asyncio loop running on this
    # thread while it is open, and tests elsewhere in the same process call asyncio.run().
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _serve(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory,
           name: str, flags: list[str]) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("browser-logs") / f"{name}.log"
    server = start_server(tiny_checkpoint("glm-4.6v"), log, flags)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Callable[..., Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tiny_checkpoint, tmp_path_factory, "page",
                      ["--max-media-bytes", str(MAX_MEDIA_BYTES)])


@pytest.fixture(scope="session")
def key_server(tiny_checkpoint: Callable[..., Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tiny_checkpoint, tmp_path_factory, "page-key", ["--api-key", API_KEY])


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[[Server], Any]]:
    """`(server) -> page` opened on the server's chat page, in a fresh context. The test fails
    if the page's JavaScript throws an uncaught error."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_page(srv: Server) -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        context.on("page", lambda p: p.on("pageerror", lambda exc: errors.append(str(exc))))
        page = context.new_page()
        page.set_default_timeout(20000)
        # expect()'s own wait (5 s by default) too: the suite shares two cores with servers
        from playwright.sync_api import expect
        expect.set_options(timeout=20000)
        page.goto(srv.url + "/")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(new_page: Callable[[Server], Any], server: Server) -> Any:
    """The chat page on `server`, with the model loaded into the header."""
    from playwright.sync_api import expect

    opened = new_page(server)
    expect(opened.get_by_test_id("model-name")).to_have_text(model_id(server))
    return opened


def model_id(server: Server) -> str:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return str(httpx.get(server.api + "/models", headers=headers).json()["data"][0]["id"])


def metric(server: Server, name: str) -> float:
    """The sum of a /metrics series (0 when it has no sample yet)."""
    text = httpx.get(server.url + "/metrics",
                     headers={"Authorization": f"Bearer {API_KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def write_png(path: Path, size: tuple[int, int] = (48, 32), color: str = "red",
              noise: bool = False) -> Path:
    """A PNG the page can attach: one flat colour, or random noise (which PNG cannot shrink)."""
    import numpy as np
    from PIL import Image

    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    else:
        Image.new("RGB", size, color).save(path)
    return path


def send(page: Any, text: str) -> None:
    page.get_by_test_id("composer-input").fill(text)
    page.get_by_test_id("send").click()


def wait_done(page: Any, count: int = 1) -> Any:
    """The `count`-th assistant message once its stream has ended (the Stop button gone)."""
    from playwright.sync_api import expect

    message = page.get_by_test_id("message-assistant").nth(count - 1)
    expect(message).to_have_attribute("data-done", "true")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    expect(page.get_by_test_id("send")).to_be_visible()
    return message
