"""The gateway's protocol: pydantic models of the OpenAI requests it validates, and the response shapes its OpenAPI
document declares. The API itself is described in docs/api.md.

Requests accept unknown fields (``extra="allow"``): the gateway logs their names and forwards to the engine only
those in :data:`ENGINE_EXTRAS` (vLLM's sampling extras such as ``top_k`` or ``ignore_eos``); the rest are dropped, so
a client cannot reach engine switches the gateway does not vouch for (``chat_template``, ``mm_processor_kwargs``,
``kv_transfer_params``, …). Content parts are limited to ``text`` and ``image_url``: other part
types (``video_url``, ``audio_url``, …) would make an engine fetch URLs itself and are refused.

Response models are documentation only (handlers return JSON themselves); they accept extra fields because engines
add their own (``stop_reason``, ``prompt_logprobs``, …).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- chat completions (OpenAI ``POST /v1/chat/completions``) --------------------------------------------------------


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Open):
    role: Literal["developer", "system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


#: Fields outside the OpenAI schema that are passed on to the engine: vLLM's sampling and output extras, and the
#: OpenAI fields vLLM understands that the model above does not spell out.
ENGINE_EXTRAS = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "bad_words",
    "allowed_token_ids", "truncate_prompt_tokens", "prompt_logprobs", "structured_outputs", "return_token_ids",
    "return_tokens_as_token_ids", "add_special_tokens", "priority", "cache_salt", "logit_bias", "user",
})
#: Gateway extensions read off the body before it goes to the engine (any-to-any generation).
GATEWAY_EXTRAS = frozenset({"modalities", "image_options", "tools", "tool_choice", "parallel_tool_calls"})


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    #: MGM's any-to-any extension (docs/api.md §1.2): ["text", "image"] runs generation mode and draws the caption;
    #: checked by server.gateway.any_to_any (declared here for the OpenAPI document).
    modalities: list[str] | None = Field(default=None, description='["text"] or ["text", "image"] (generation mode)')
    image_options: ImageOptions | None = Field(default=None, description="how generation mode's images are drawn")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def unknown_fields(self) -> list[str]:
        """Names of top-level fields that are not part of the schema (logged, forwarded)."""
        return sorted(self.model_extra or {})

    def text_chars(self) -> int:
        """Characters of text in the messages (what the engine will tokenise, images aside)."""
        total = 0
        for m in self.messages:
            if isinstance(m.content, str):
                total += len(m.content)
            elif m.content:
                total += sum(len(p.text) for p in m.content if isinstance(p, TextPart))
        return total


# --- images (OpenAI ``POST /v1/images/generations``; chat's ``image_options``) ---------------------------------------

#: ``quality`` → denoising steps. Unset or ``auto``: the worker's default, the official MGM setting (diffusers'
#: SDXL default of 50 steps); SDXL gains little past 50, so the top values share it.
STEPS = {"low": 20, "medium": 30, "standard": 30, "high": 50, "hd": 50, "xhigh": 50, "max": 50}
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
#: ``style`` → classifier-free guidance; ``natural`` is diffusers' SDXL default, the official MGM setting.
GUIDANCE = {"natural": 5.0, "vivid": 7.5}


def _not_a_bool(v: Any) -> Any:
    """JSON ``true`` is not a number (pydantic's lax mode would take it as 1); multipart strings still convert."""
    if isinstance(v, bool):
        raise ValueError("must be a number, not a boolean")
    return v


class ImageOptions(_Open):
    """What an image costs and looks like; shared by the images API and chat's ``image_options``."""

    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: Quality | None = None
    style: Literal["vivid", "natural"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    #: SDXL has no alpha channel: ``transparent`` is refused (validator below), ``auto``/``opaque`` are the same.
    background: Literal["auto", "opaque", "transparent"] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0, le=30, allow_inf_nan=False)

    _numbers = field_validator("output_compression", "seed", "num_inference_steps", "guidance_scale",
                               mode="before")(_not_a_bool)

    @field_validator("background")
    @classmethod
    def _opaque(cls, v: str | None) -> str | None:
        if v == "transparent":
            raise ValueError("SDXL draws opaque images (no alpha channel); use 'auto' or 'opaque'")
        return v

    @property
    def format(self) -> str:
        return self.output_format or "png"

    def worker_payload(self, prompt: str, n: int, width: int, height: int) -> dict[str, Any]:
        """The SDXL worker's ``/v1/generate`` body; explicit steps/guidance win over quality/style."""
        payload: dict[str, Any] = {
            "prompt": prompt, "n": n, "width": width, "height": height,
            "guidance_scale": float(self.guidance_scale if self.guidance_scale is not None
                                    else GUIDANCE[self.style or "natural"]),
        }
        if steps := self.num_inference_steps or STEPS.get(self.quality or "auto"):
            payload["num_inference_steps"] = steps  # else the worker's official default
        if self.output_format not in (None, "png"):  # PNG is every worker's default (older ones know nothing else)
            payload["output_format"] = self.output_format
        if self.output_compression is not None:
            payload["output_compression"] = self.output_compression
        if self.seed is not None:
            payload["seed"] = self.seed
        if "negative_prompt" in self.model_fields_set:  # omitted → the worker's official default
            payload["negative_prompt"] = self.negative_prompt or None
        return payload


class ImageGenerationRequest(ImageOptions):
    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    #: Accepted for the SDKs' sake and not acted on: the gateway runs no moderation model, and ``user`` is only logged.
    moderation: Literal["auto", "low"] | None = None
    user: str | None = None
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0, le=3)
    enhance_prompt: bool = True

    _counts = field_validator("n", "partial_images", mode="before")(_not_a_bool)

    @property
    def kind(self) -> str:
        """The prefix of the stream's event types."""
        return "image_generation"


class ImageReference(BaseModel):
    """OpenAI's JSON reference to an image in an edit: a URL or data URL, or the id of an uploaded file."""

    image_url: str | None = None
    file_id: str | None = None


class ImageEditRequest(ImageGenerationRequest):
    """``POST /v1/images/edits``: the images (multipart uploads, or URLs / data URLs in JSON) are read off the request
    by the route; ``image``/``images``/``mask`` here are the JSON forms (``images`` and an object ``mask`` are
    OpenAI's references, plain URL strings are this server's shorthand)."""

    image: str | list[str] | None = None
    images: list[ImageReference] | None = None
    mask: str | ImageReference | None = None
    #: How far SDXL moves away from the first image (img2img/inpaint ``strength``); the worker's default when unset.
    strength: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)

    _strength = field_validator("strength", mode="before")(_not_a_bool)

    @property
    def kind(self) -> str:
        return "image_edit"

    def worker_payload(self, prompt: str, n: int, width: int, height: int) -> dict[str, Any]:
        payload = super().worker_payload(prompt, n, width, height)
        if self.strength is not None:
            payload["strength"] = self.strength
        return payload


# --- response shapes (OpenAPI only) ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ChatMessage(_Open):
    role: Literal["assistant"]
    content: str | None = None
    images: list[Any] | None = None  # any-to-any: the images drawn from the answer's caption


class ChatChoice(_Open):
    index: int
    message: ChatMessage
    finish_reason: str | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, Any] | None = None


#: One event of a chat stream: data is a ``chat.completion.chunk`` (JSON) or ``[DONE]``; event ``error`` ends a failed
#: stream.
CHAT_STREAM_EVENT: dict[str, Any] = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "anyOf": [{"const": "[DONE]"}, {"pattern": "^\\{"}]},
                   "event": {"enum": ["message", "error"]}}}

#: One event of an image stream (``stream: true`` on ``/v1/images/*``): OpenAI's named events, JSON data.
IMAGE_STREAM_EVENT: dict[str, Any] = {
    "type": "object", "required": ["event", "data"],
    "properties": {"data": {"type": "string", "pattern": "^\\{"},
                   "event": {"enum": [f"{kind}.{suffix}" for kind in ("image_generation", "image_edit")
                                      for suffix in ("partial_image", "completed")] + ["error"]}}}


class CompletionRequest(_Open):
    """``POST /v1/completions`` (OpenAI's legacy text completions): the prompt as text or token ids."""

    model: str = Field(min_length=1)
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)] | Annotated[
        list[int], Field(min_length=1)] | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(
            min_length=1, max_length=16)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def text_chars(self) -> int:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return sum(len(p) for p in prompts if isinstance(p, str))


class ImageDatum(_Open):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(_Open):
    created: int
    data: list[ImageDatum]
    size: str | None = None
    output_format: str | None = None
    prompt_enhancement: Literal["enhanced", "no_caption", "disabled"] | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"]


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(_Open):
    status: Literal["ready"]
    engines: list[dict[str, Any]]


class NotReady(_Open):
    error: ErrorDetail
    engines: list[dict[str, Any]]


ChatCompletionRequest.model_rebuild()  # image_options refers to ImageOptions, defined below it
