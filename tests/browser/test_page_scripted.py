"""What the page makes of a reply, with the reply scripted (`page.route` fulfils the chat request).

The tiny model has random weights, so it cannot be asked for a `<script>` tag, reasoning, a box
or a tool call; these tests serve a hand-written SSE stream in OpenAI's chunk shape instead.
The page itself (and /v1/models) still comes from a real `glmv serve`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.browser.conftest import send, wait_done, write_png

CHAT = "**/v1/chat/completions"

XSS = ('Here: <script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned=2"> '
       "end")


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def sse(*deltas: dict[str, Any], finish: str = "stop") -> str:
    """A chat-completions stream: a role chunk, one chunk per delta, a finish chunk, [DONE]."""
    chunks = [{"role": "assistant", "content": ""}, *deltas]
    events = [{"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in chunks]
    events.append({"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def script(page: Any, *bodies: str, status: int = 200) -> list[dict[str, Any]]:
    """Answer the page's chat requests with `bodies` in turn; returns the request bodies seen."""
    seen: list[dict[str, Any]] = []

    def fulfil(route: Any) -> None:
        seen.append(json.loads(route.request.post_data))
        body = bodies[min(len(seen), len(bodies)) - 1]
        kind = "text/event-stream" if status == 200 else "application/json"
        route.fulfill(status=status, headers={"content-type": kind}, body=body)

    page.route(CHAT, fulfil)
    return seen


def test_html_in_an_answer_is_shown_as_text(page: Any) -> None:
    expect = _expect()
    script(page, sse({"content": XSS[:20]}, {"content": XSS[20:]},
                     {"content": "\n\n**bold** and [a link](https://example.com/x) and "
                                 "[bad](javascript:alert(1))\n\n```\n<b>code</b>\n```"}))
    send(page, "Say something dangerous")
    answer = wait_done(page).get_by_test_id("answer")
    expect(answer).to_contain_text("<script>window.__pwned = 1</script>")
    expect(answer).to_contain_text('<img src=x onerror="window.__pwned=2">')
    assert answer.locator("script, img, b").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # The small markdown subset: bold, http(s) links only (opened with noopener), code blocks.
    expect(answer.locator("strong")).to_have_text("bold")
    links = answer.locator("a")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == "https://example.com/x"
    assert "noopener" in links.get_attribute("rel")
    expect(answer).to_contain_text("[bad](javascript:alert(1))")
    expect(answer.locator("pre code")).to_have_text("<b>code</b>")


def test_reasoning_goes_to_the_thinking_panel(page: Any) -> None:
    expect = _expect()
    seen = script(page, sse({"reasoning_content": "The user greets me. "},
                            {"reasoning_content": "I should greet back."},
                            {"content": "Hello **friend**!"}))
    send(page, "Hi")
    message = wait_done(page)
    panel = message.get_by_test_id("thinking-panel")
    expect(panel).to_be_visible()
    expect(panel.locator("summary")).to_have_text("Thinking")
    expect(panel).to_contain_text("The user greets me. I should greet back.")
    answer = message.get_by_test_id("answer")
    expect(answer).to_have_text("Hello friend!")
    # The panel sits above the answer; collapsing it hides the reasoning, not the answer.
    assert panel.bounding_box()["y"] < answer.bounding_box()["y"]
    panel.locator("summary").click()
    expect(message.get_by_test_id("thinking-text")).to_be_hidden()
    expect(answer).to_be_visible()

    # The reasoning is never sent back in the next turn.
    send(page, "Again")
    wait_done(page, 2)
    assert seen[1]["messages"][1] == {"role": "assistant", "content": "Hello **friend**!"}


def test_boxes_are_drawn_over_the_image_they_refer_to(page: Any, tmp_path: Path) -> None:
    expect = _expect()
    first = write_png(tmp_path / "first.png", size=(200, 100), color="green")
    second = write_png(tmp_path / "second.png", size=(120, 160), color="blue")
    box = {"box": [100, 200, 600, 900], "pixels": [12.0, 32.0, 72.0, 144.0], "image_index": 1,
           "label": "the blue square", "text": "[[100,200,600,900]]"}
    seen = script(page, sse({"content": "A green picture."}),
                  sse({"content": "It is here: [[100,200,600,900]]"}, {"boxes": [box]}))

    # Two turns, one image each: image_index 1 is the second turn's image.
    page.get_by_test_id("attach-input").set_input_files(str(first))
    send(page, "What is this?")
    wait_done(page)
    page.get_by_test_id("attach-input").set_input_files(str(second))
    send(page, "Where is the blue square?")
    message = wait_done(page, 2)

    second_url = seen[1]["messages"][2]["content"][0]["image_url"]["url"]
    figure = message.get_by_test_id("annotated-image")
    expect(figure).to_have_count(1)
    image = figure.locator("img")
    assert image.get_attribute("src") == second_url
    overlay = figure.get_by_test_id("box-overlay")
    expect(overlay).to_have_count(1)
    expect(overlay.get_by_test_id("box-label")).to_have_text("the blue square")
    style = overlay.get_attribute("style")
    for prop, value in (("left", "10%"), ("top", "20%"), ("width", "50%"), ("height", "70%")):
        assert f"{prop}: {value}" in style, style
    # And on screen: the rectangle covers those fractions of the displayed image (2px border).
    expect(image).to_be_visible()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0",
                           arg=image.element_handle())
    img, rect = image.bounding_box(), overlay.bounding_box()
    assert abs(rect["x"] - (img["x"] + 0.1 * img["width"])) <= 2
    assert abs(rect["y"] - (img["y"] + 0.2 * img["height"])) <= 2
    assert abs(rect["width"] - 0.5 * img["width"]) <= 2
    assert abs(rect["height"] - 0.7 * img["height"]) <= 2


def test_tool_calls_are_shown_as_blocks(page: Any) -> None:
    expect = _expect()
    seen = script(page, sse(
        {"content": "Let me check."},
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ris", "days": 3}'}}]},
        finish="tool_calls"), sse({"content": "Sunny."}))
    send(page, "Weather in Paris?")
    message = wait_done(page)
    block = message.get_by_test_id("tool-call")
    expect(block).to_have_count(1)
    expect(block.get_by_test_id("tool-name")).to_have_text("get_weather")
    expect(block.get_by_test_id("tool-args")).to_have_text(
        json.dumps({"city": "Paris", "days": 3}, indent=2))
    expect(message.get_by_test_id("answer")).to_have_text("Let me check.")

    send(page, "Thanks")
    wait_done(page, 2)
    assert seen[1]["messages"][1] == {
        "role": "assistant", "content": "Let me check.",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather",
                                     "arguments": '{"city": "Paris", "days": 3}'}}]}


def test_refusals_and_in_band_errors_are_shown(page: Any) -> None:
    expect = _expect()
    in_band = ('data: {"choices": [{"index": 0, "delta": {"content": "partial"}}]}\n\n'
               'data: {"error": {"message": "the engine failed: boom", "code": 500}}\n\n'
               "data: [DONE]\n\n")
    script(page, in_band)
    send(page, "First")
    message = wait_done(page)
    expect(message.get_by_test_id("error")).to_contain_text("the engine failed: boom")
    expect(page.get_by_test_id("composer-input")).to_have_value("First")

    page.unroute(CHAT)
    refusal = json.dumps({"error": {"message": "temperature must be at most 2", "code": 400}})
    seen = script(page, refusal, status=400)
    page.get_by_test_id("send").click()
    message = wait_done(page, 2)
    expect(message.get_by_test_id("error")).to_have_text("temperature must be at most 2")
    expect(page.get_by_test_id("composer-input")).to_have_value("First")
    # Neither failed turn went into the history.
    assert seen[0]["messages"] == [{"role": "user", "content": "First"}]


def test_thinking_switch_is_disabled_when_the_model_always_thinks(page: Any) -> None:
    expect = _expect()

    def always(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        body["data"][0]["glmv"]["thinking"] = "always"
        route.fulfill(response=response, json=body)

    fresh = page.context.new_page()
    fresh.route("**/v1/models", always)
    fresh.goto(page.url)
    toggle = fresh.get_by_test_id("thinking-toggle")
    expect(toggle).to_be_disabled()
    expect(toggle).to_be_checked()
    expect(fresh.get_by_test_id("model-limits")).to_contain_text("thinking always")
    fresh.route(CHAT, lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=sse({"content": "ok"})))
    with fresh.expect_request(CHAT) as request:
        send(fresh, "Hi")
    assert "chat_template_kwargs" not in request.value.post_data_json
    wait_done(fresh)


def test_markdown_subset(page: Any) -> None:
    expect = _expect()
    script(page, sse({"content": "# Title\n\n- one\n- two\n\n1. first\n2. second\n\n"
                                 "*it* and snake_case_name and `x<y` and __strong__"}))
    send(page, "Format something")
    answer = wait_done(page).get_by_test_id("answer")
    expect(answer.locator("h3")).to_have_text("Title")
    expect(answer.locator("ul > li")).to_have_text(["one", "two"])
    expect(answer.locator("ol > li")).to_have_text(["first", "second"])
    expect(answer.locator("em")).to_have_text("it")
    expect(answer.locator("code")).to_have_text("x<y")
    expect(answer.locator("strong")).to_have_text("strong")
    expect(answer).to_contain_text("snake_case_name")


def test_drop_paste_and_the_shape_of_each_attachment(page: Any, tmp_path: Path) -> None:
    expect = _expect()
    seen = script(page, sse({"content": "ok"}))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    page.get_by_test_id("attach-input").set_input_files(str(video))
    # A PDF dropped on the page, an image pasted into the composer (synthetic browser events).
    page.evaluate("""() => {
        const drop = new DataTransfer();
        drop.items.add(new File(["%PDF-1.4 demo"], "report.pdf", {type: "application/pdf"}));
        document.getElementById("composer").dispatchEvent(
            new DragEvent("drop", {dataTransfer: drop, bubbles: true, cancelable: true}));
    }""")
    expect(page.get_by_test_id("attachment-thumb")).to_have_count(2)
    page.evaluate("""async () => {
        const canvas = Object.assign(document.createElement("canvas"), {width: 8, height: 8});
        const blob = await new Promise((done) => canvas.toBlob(done, "image/png"));
        const paste = new DataTransfer();
        paste.items.add(new File([blob], "pasted.png", {type: "image/png"}));
        document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: paste, bubbles: true, cancelable: true}));
    }""")
    thumbs = page.get_by_test_id("attachment-thumb")
    expect(thumbs).to_have_count(3)
    expect(thumbs.nth(0)).to_contain_text("Video · clip.mp4")
    expect(thumbs.nth(1)).to_contain_text("PDF · report.pdf")
    expect(thumbs.nth(2).locator("img")).to_be_visible()

    send(page, "Three things")
    wait_done(page)
    video_part, pdf_part, image_part, text_part = seen[0]["messages"][0]["content"]
    assert video_part["type"] == "video_url"
    assert video_part["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert pdf_part["type"] == "file" and pdf_part["file"]["filename"] == "report.pdf"
    assert pdf_part["file"]["file_data"].startswith("data:application/pdf;base64,")
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": "Three things"}
