"""The offline API: `from glmv import LLM, SamplingParams`, prompts in every accepted shape,
OpenAI-format chat messages with media by path, data URL and PIL image, batches of
conversations, and bad input."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

from glmv import LLM, SamplingParams
from glmv.errors import MediaError, PromptError
from tests.helpers import write_mp4

ROOT = Path(__file__).resolve().parents[1]
HOUSE = ROOT / "examples" / "house.png"
GREEDY = SamplingParams.greedy(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Any) -> LLM:
    return LLM(str(tiny_checkpoint("glm-4.6v-flash")), dtype="float32", kv_cache_memory=0.05,
               show_progress=False)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("av")
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4")


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def test_generate_accepts_every_prompt_shape(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("[gMASK]<sop><|user|>\nHello<|assistant|>\n")
    by_text = llm.generate("[gMASK]<sop><|user|>\nHello<|assistant|>\n", GREEDY,
                           use_tqdm=False)
    by_ids = llm.generate(ids, GREEDY, use_tqdm=False)
    by_dict = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert len(by_text) == len(by_ids) == len(by_dict) == 1
    assert by_text[0].prompt_token_ids == ids
    assert (by_text[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids
            == by_dict[0].outputs[0].token_ids)
    assert len(by_text[0].outputs[0].token_ids) == 4
    assert by_text[0].outputs[0].finish_reason == "length"


def test_generate_with_multi_modal_data(llm: LLM) -> None:
    prompt = ("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
              "What is it?<|assistant|>\n")
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": PIL.Image.open(HOUSE)}},
                       GREEDY, use_tqdm=False)[0]
    assert out.num_image_tokens > 0 and out.num_video_tokens == 0
    assert out.num_prompt_tokens > out.num_image_tokens


def test_a_batch_keeps_input_order_and_matches_single_runs(llm: LLM) -> None:
    prompts = [f"[gMASK]<sop><|user|>\nQuestion {i}: {'why ' * i}<|assistant|>\n"
               for i in range(5)]
    batch = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in batch] == prompts
    for prompt, output in zip(prompts, batch, strict=True):
        single = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        assert single.outputs[0].token_ids == output.outputs[0].token_ids


def test_per_prompt_sampling_params(llm: LLM) -> None:
    outs = llm.generate(["[gMASK]<sop>a", "[gMASK]<sop>b"],
                        [SamplingParams.greedy(max_tokens=2, ignore_eos=True),
                         SamplingParams.greedy(max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(PromptError, match="2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])


def test_chat_media_by_path_data_url_and_pil(llm: LLM) -> None:
    data = base64.b64encode(HOUSE.read_bytes()).decode()
    forms = [
        {"type": "image_url", "image_url": {"url": str(HOUSE)}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "image_pil", "image_pil": PIL.Image.open(HOUSE)},
        {"type": "image", "image": PIL.Image.open(HOUSE)},
    ]
    outs = [llm.chat(user(form, text("Describe.")), GREEDY, use_tqdm=False)[0] for form in forms]
    assert len({tuple(o.prompt_token_ids) for o in outs}) == 1  # the same picture each time
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].num_image_tokens > 0


def test_chat_with_video(llm: LLM, video_file: Path) -> None:
    out = llm.chat(user({"type": "video_url", "video_url": {"url": str(video_file)}},
                        text("What happens?")), GREEDY, use_tqdm=False)[0]
    assert out.num_video_tokens > 0 and out.num_image_tokens == 0
    assert len(out.outputs[0].token_ids) == 4


def test_a_list_of_conversations_is_one_batch(llm: LLM) -> None:
    conversations = [user(text("Hi")),
                     user({"type": "image_url", "image_url": {"url": str(HOUSE)}}, text("Where?")),
                     [{"role": "system", "content": "Be brief."}, *user(text("Why?"))]]
    steps_before = llm.llm_engine.num_steps
    batch = llm.chat(conversations, GREEDY, use_tqdm=False)
    batch_steps = llm.llm_engine.num_steps - steps_before
    assert batch_steps == 4  # one prefill step and three decode steps for all three together
    singles = [llm.chat(c, GREEDY, use_tqdm=False)[0] for c in conversations]
    assert [o.outputs[0].token_ids for o in batch] == [o.outputs[0].token_ids for o in singles]


def test_chat_template_kwargs_and_tools(llm: LLM) -> None:
    messages = user(text("Weather in Paris?"))
    off = llm.chat(messages, GREEDY, chat_template_kwargs={"enable_thinking": False},
                   use_tqdm=False)[0]
    assert off.prompt is not None and off.prompt.endswith("<|assistant|>\n<think></think>\n")
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}}}}}
    with_tools = llm.chat(messages, GREEDY, tools=[tool], use_tqdm=False)[0]
    assert with_tools.prompt is not None and "get_weather" in with_tools.prompt


def test_bad_media_raises_and_leaves_nothing_behind(llm: LLM, tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(MediaError, match=r"nope\.png"):
        llm.chat([user(text("ok"))[0],
                  *user({"type": "image_url", "image_url": {"url": str(missing)}})], GREEDY)
    garbage = io.BytesIO(b"not an image at all")
    with pytest.raises(MediaError):
        llm.chat(user({"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(garbage.getvalue()).decode()}}),
            GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("[gMASK]<sop>still fine", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_too_long_prompt(llm: LLM) -> None:
    limit = llm.llm_engine.scheduler_config.max_model_len
    with pytest.raises(PromptError, match=f"max_model_len is {limit}"):
        llm.generate([1] * limit, GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()
