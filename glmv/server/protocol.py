"""Request bodies of the HTTP API as pydantic models (OpenAI's field names, vLLM's extras).

Responses are plain JSON built by the serving modules; requests are validated here so a wrong
type answers 422 naming the field. Unknown fields are ignored, as OpenAI-compatible servers do,
so clients written for vLLM or MindIE keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False  # one last chunk with the usage and no choices


class SamplingFields(_Body):
    """Sampling fields shared by chat and completions (OpenAI's, then vLLM's/MindIE's extras
    sent at the top level of the body)."""

    max_tokens: int | None = Field(default=None, description="tokens to generate at most")
    n: int = Field(default=1, description="completions per prompt")
    temperature: float | None = Field(default=None, description="0 = greedy")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM / MindIE extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    do_sample: bool | None = Field(default=None, description="MindIE: false = greedy")
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    priority: int = 0
    logit_bias: dict[str, float] | None = None


class ChatMessage(_Body):
    """One message of a conversation; content parts stay plain dicts (the processor checks
    them and names what is wrong)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    thinking_budget: int | None = Field(
        default=None, description="reasoning tokens after which </think> is forced")


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(_Body):
    """Either `prompt` (raw text, no template) or `messages` (rendered like a chat request)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    return_token_ids: bool = True


class GenerateParameters(_Body):
    """TGI-style `parameters` of MindIE's older /generate."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    details: bool = False


class GenerateRequest(_Body):
    """MindIE's /generate: `prompt` (text or content parts) with flat sampling fields, or
    TGI-style `inputs` + `parameters`."""

    prompt: str | list[dict[str, Any]] | None = None
    inputs: str | list[dict[str, Any]] | None = None
    parameters: GenerateParameters | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    do_sample: bool | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
