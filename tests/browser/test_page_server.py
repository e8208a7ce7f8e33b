"""The chat page against a real `glmv serve` (random-weight tiny glm-4.6v: gibberish, but real).

Each test drives the page the way a person would (type, attach, click) and checks what the
server saw: the request body the page sent, or the server's /metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.browser.conftest import (
    API_KEY,
    metric,
    model_id,
    send,
    wait_done,
    write_png,
)
from tests.e2e.conftest import Server

CHAT = "**/v1/chat/completions"


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def test_text_message_streams_an_answer_and_keeps_history(page: Any) -> None:
    expect = _expect()
    page.get_by_test_id("thinking-toggle").uncheck()  # all output is answer text
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("max-tokens").fill("24")
    send(page, "Hello there")
    expect(page.get_by_test_id("message-user").first).to_have_text("Hello there")
    # While streaming the Stop button replaces Send.
    message = wait_done(page)
    answer = message.get_by_test_id("answer")
    first_answer = answer.inner_text()
    assert first_answer.strip(), "the streamed answer is empty"
    # The page counts the SSE delta events it rendered: a stream, not one blob.
    assert int(message.get_attribute("data-chunks")) > 1
    assert "finish:" in message.locator(".meta").inner_text()

    # Second turn: the whole history goes back, the assistant turn as plain content.
    with page.expect_request(CHAT) as second:
        send(page, "And again")
    body = second.value.post_data_json
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"] == "Hello there"
    assistant = body["messages"][1]
    assert "reasoning_content" not in assistant
    assert isinstance(assistant["content"], str) and assistant["content"].strip()
    assert body["stream"] is True and body["model"] == page.get_by_test_id(
        "model-name").inner_text()
    wait_done(page, 2)

    # New chat clears the conversation: the next request holds one message.
    page.get_by_test_id("new-chat").click()
    expect(page.get_by_test_id("message-assistant")).to_have_count(0)
    with page.expect_request(CHAT) as third:
        send(page, "Fresh start")
    assert len(third.value.post_data_json["messages"]) == 1
    wait_done(page)


def test_attached_image_reaches_the_model(page: Any, server: Server, tmp_path: Path) -> None:
    expect = _expect()
    red = write_png(tmp_path / "red.png", color="red")
    blue = write_png(tmp_path / "blue.png", color="blue")
    attach = page.get_by_test_id("attach-input")
    attach.set_input_files([str(red), str(blue)])
    thumbs = page.get_by_test_id("attachment-thumb")
    expect(thumbs).to_have_count(2)
    # Removing one leaves the other.
    thumbs.nth(1).get_by_test_id("attachment-remove").click()
    expect(thumbs).to_have_count(1)
    expect(thumbs.first.locator("img")).to_be_visible()
    assert thumbs.first.locator("img").get_attribute("src").startswith("data:image/png;base64,")

    before = metric(server, 'glmv_visual_tokens_total{modality="image"}')
    page.get_by_test_id("max-tokens").fill("8")
    with page.expect_request(CHAT) as request:
        send(page, "What is in this picture?")
    parts = request.value.post_data_json["messages"][0]["content"]
    assert parts[0]["type"] == "image_url"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "What is in this picture?"}
    wait_done(page)
    expect(page.get_by_test_id("attachment-thumb")).to_have_count(0)  # sent, composer empty
    expect(page.get_by_test_id("sent-attachment")).to_have_count(1)  # shown in the user turn
    assert metric(server, 'glmv_visual_tokens_total{modality="image"}') > before


def test_thinking_switch_and_budget_go_into_the_request(page: Any) -> None:
    toggle = page.get_by_test_id("thinking-toggle")
    assert toggle.is_checked() and toggle.is_enabled()  # glm-4.6v: hybrid thinking
    page.get_by_test_id("max-tokens").fill("8")
    with page.expect_request(CHAT) as on:
        send(page, "Think about it")
    assert on.value.post_data_json["chat_template_kwargs"] == {"enable_thinking": True}
    assert "thinking_budget" not in on.value.post_data_json
    wait_done(page)

    toggle.uncheck()
    page.get_by_test_id("thinking-budget").fill("64")
    page.get_by_test_id("temperature").fill("0.5")
    page.get_by_test_id("top-p").fill("0.9")
    with page.expect_request(CHAT) as off:
        send(page, "Now without thinking")
    body = off.value.post_data_json
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["thinking_budget"] == 64
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["max_tokens"] == 8
    wait_done(page, 2)


def test_stop_aborts_the_request_on_the_server(page: Any, server: Server) -> None:
    expect = _expect()

    # A random-weight model may write its end token early: for this test only, the request
    # the page sends also asks the server to ignore it, so the stream surely outlasts the click.
    def keep_going(route: Any) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route(CHAT, keep_going)
    finished_by_length = metric(server, 'glmv_requests_finished_total{reason="length"}')
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("max-tokens").fill("3000")
    send(page, "Tell me a very long story")
    message = page.get_by_test_id("message-assistant").first
    expect(message.get_by_test_id("answer")).not_to_be_empty()
    expect(page.get_by_test_id("stop")).to_be_visible()
    deadline = time.monotonic() + 10
    while metric(server, "glmv_num_requests_running") < 1:
        assert time.monotonic() < deadline, "the request never ran on the server"
        time.sleep(0.05)

    page.get_by_test_id("stop").click()
    expect(page.get_by_test_id("stop")).to_be_hidden()
    expect(message).to_have_attribute("data-done", "true")
    expect(message.locator(".meta")).to_have_text("stopped")
    deadline = time.monotonic() + 20
    while metric(server, "glmv_num_requests_running") > 0:
        assert time.monotonic() < deadline, "the server still runs the stopped request"
        time.sleep(0.1)
    # Aborted, not run to its 3000 tokens.
    assert metric(server, 'glmv_requests_finished_total{reason="length"}') == finished_by_length
    # The page is usable again.
    expect(page.get_by_test_id("send")).to_be_enabled()


def test_oversized_attachment_shows_the_server_error(page: Any, tmp_path: Path) -> None:
    expect = _expect()
    big = write_png(tmp_path / "noise.png", size=(190, 180), noise=True)
    assert big.stat().st_size > 90_000
    page.get_by_test_id("attach-input").set_input_files(str(big))
    expect(page.get_by_test_id("attachment-thumb")).to_have_count(1)
    send(page, "Look at this")
    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("--max-media-bytes")
    # The refused message is back in the composer, ready to retry.
    expect(page.get_by_test_id("composer-input")).to_have_value("Look at this")
    expect(page.get_by_test_id("attachment-thumb")).to_have_count(1)
    expect(page.get_by_test_id("stop")).to_be_hidden()

    # Still usable: drop the attachment and send; the refused turn is not in the history.
    page.get_by_test_id("attachment-remove").click()
    page.get_by_test_id("max-tokens").fill("8")
    with page.expect_request(CHAT) as retry:
        page.get_by_test_id("send").click()
    assert retry.value.post_data_json["messages"] == [{"role": "user", "content": "Look at this"}]
    wait_done(page, 2)


def test_api_key_prompt(new_page: Any, key_server: Server) -> None:
    expect = _expect()
    page = new_page(key_server)
    panel = page.get_by_test_id("api-key-panel")
    expect(panel).to_be_visible()
    expect(page.get_by_test_id("model-name")).to_have_text("API key needed")

    # A wrong key is refused and the prompt stays.
    page.get_by_test_id("api-key-input").fill("sk-wrong")
    page.get_by_test_id("api-key-save").click()
    expect(panel).to_contain_text("refused")
    expect(panel).to_be_visible()

    page.get_by_test_id("api-key-input").fill(API_KEY)
    page.get_by_test_id("api-key-save").click()
    expect(panel).to_be_hidden()
    expect(page.get_by_test_id("model-name")).to_have_text(model_id(key_server))
    assert page.evaluate("sessionStorage.getItem('glmv.apiKey')") == API_KEY

    page.get_by_test_id("thinking-toggle").uncheck()
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("max-tokens").fill("8")
    with page.expect_request(CHAT) as request:
        send(page, "Hello with a key")
    assert request.value.headers["authorization"] == f"Bearer {API_KEY}"
    message = wait_done(page)
    expect(message.get_by_test_id("error")).to_have_count(0)
    assert message.get_by_test_id("answer").inner_text().strip()

    # The key survives a reload of the tab (sessionStorage), so no prompt then.
    page.reload()
    expect(page.get_by_test_id("model-name")).to_have_text(model_id(key_server))
    expect(panel).to_be_hidden()
