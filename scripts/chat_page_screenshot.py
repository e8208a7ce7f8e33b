"""Take docs/chat-page.png: the chat page of `glmv serve` with a conversation on it.

The reply in the screenshot is SCRIPTED: the demo model (a tiny checkpoint written here) has
random weights, so its own answers are gibberish. The page, its header (model name and limits
from /v1/models) and everything it draws are real; only the POST /v1/chat/completions answer is
replaced, through Playwright's `page.route`, by a hand-written stream in OpenAI's chunk shape
with reasoning, a Markdown answer and a grounding box (`boxes`) over the attached picture.

    python scripts/chat_page_screenshot.py [--out docs/chat-page.png] [--chromium PATH]

Needs playwright (the Python package) and a chromium binary (Debian's /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from glmv.tiny.writer import TinyCheckpointSpec, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

REASONING = ("The user asks where the red ball is. The picture shows a grassy field under a "
             "light sky: a red circle on the left and a blue square on the right. The red "
             "circle is the ball, so I should give its box in 0-1000 coordinates of the image.")
ANSWER = ("The **red ball** is on the left side of the picture, resting on the grass:\n\n"
          "- position: left third, lower half\n"
          "- next to it: a *blue square* on the right\n\n"
          "Its box is `[[156,458,391,771]]`.")
BOX = {"box": [156, 458, 391, 771], "pixels": [99.8, 219.8, 250.2, 370.1], "image_index": 0,
       "label": "the red ball", "text": "[[156,458,391,771]]"}


def scene(path: Path) -> Path:
    """A 640x480 picture: sky, grass, a red circle and a blue square."""
    image = Image.new("RGB", (640, 480), (196, 224, 246))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 300, 640, 480), fill=(120, 186, 96))
    draw.ellipse((520, 30, 590, 100), fill=(255, 214, 90))
    draw.ellipse((100, 220, 250, 370), fill=(214, 40, 40))
    draw.rectangle((380, 170, 560, 350), fill=(40, 80, 210))
    image.save(path)
    return path


def sse(*deltas: dict[str, Any]) -> str:
    events = [{"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": "demo",
               "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
              for d in ({"role": "assistant", "content": ""}, *deltas)]
    events.append({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": "demo",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1046, "completion_tokens": 118,
                             "total_tokens": 1164}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(checkpoint: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "glmv", "serve", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--kv-cache-memory", "0.05",
           "--max-model-len", "4096", "--served-model-name", "glm-4.6v-demo"]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("glmv serve exited:\n" + log.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("glmv serve did not start:\n" + log.read_text(errors="replace")[-3000:])


def shoot(url: str, picture: Path, out: Path, chromium: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    reply = sse({"reasoning_content": REASONING[:90]}, {"reasoning_content": REASONING[90:]},
                {"content": ANSWER[:60]}, {"content": ANSWER[60:]}, {"boxes": [BOX]})
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"content-type": "text/event-stream"}, body=reply))
        page.goto(url + "/")
        expect(page.get_by_test_id("model-name")).to_have_text("glm-4.6v-demo")
        page.get_by_test_id("thinking-budget").fill("1024")
        page.get_by_test_id("temperature").fill("0.8")
        page.get_by_test_id("attach-input").set_input_files(str(picture))
        expect(page.get_by_test_id("attachment-thumb")).to_have_count(1)
        page.get_by_test_id("composer-input").fill("Where is the red ball? Give me its box.")
        page.get_by_test_id("send").click()
        message = page.get_by_test_id("message-assistant").first
        expect(message).to_have_attribute("data-done", "true")
        expect(message.get_by_test_id("box-overlay")).to_have_count(1)
        page.wait_for_function(
            "() => [...document.images].every((img) => img.complete && img.naturalWidth > 0)")
        page.get_by_test_id("composer-input").fill("Is there anything else on the grass?")
        page.evaluate("document.getElementById('messages').scrollTop = 0")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "chat-page.png")
    parser.add_argument("--chromium", default=None, help="chromium binary (default: found)")
    args = parser.parse_args()
    chromium = args.chromium or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                 else shutil.which("chromium"))
    if not chromium:
        raise SystemExit("no chromium binary found; pass --chromium PATH")
    with tempfile.TemporaryDirectory(prefix="glmv-shot-") as tmp:
        work = Path(tmp)
        checkpoint = write_checkpoint(work / "ckpt", TinyCheckpointSpec(
            "glm-4.6v", size="tiny", seed=0, dtype="bfloat16"))
        process, url = serve(checkpoint, work / "serve.log")
        try:
            shoot(url, scene(work / "scene.png"), args.out, chromium)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
