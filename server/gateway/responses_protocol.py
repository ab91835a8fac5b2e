"""Request models of OpenAI's Responses API (``POST /v1/responses``, docs/api.md §1.10): ``input`` as a string or
message items with ``input_text`` / ``input_image`` / ``output_text`` parts, ``instructions``, sampling limits,
``text.format``, ``store`` / ``previous_response_id``, and the one tool this server runs, ``image_generation``.
Like the chat models they accept unknown fields (logged, not acted on)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.gateway.protocol import ImageOptions, Quality


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputText(_Open):
    type: Literal["input_text"]
    text: str


class OutputText(_Open):
    type: Literal["output_text"]
    text: str


class InputImage(_Open):
    type: Literal["input_image"]
    image_url: str | None = None  # http(s) under the SSRF rules, or a data URL
    file_id: str | None = None  # no Files API here: refused with a clear message
    detail: Literal["auto", "low", "high"] | None = None


InputPart = Annotated[InputText | OutputText | InputImage, Field(discriminator="type")]


class InputMessage(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class ImageGenerationTool(_Open):
    """The ``image_generation`` tool: MGM's generation mode, drawn by the SDXL pool."""

    type: Literal["image_generation"]
    size: str | None = None
    quality: Quality | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    moderation: Literal["auto", "low"] | None = None
    model: str | None = None
    # extensions, as on the images API (validated by ImageOptions)
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None

    def image_options(self) -> ImageOptions:
        """The shared image options (validated there too: ``transparent`` is refused like on the images API)."""
        fields = self.model_dump(include={"size", "quality", "output_format", "output_compression", "background",
                                          "seed", "num_inference_steps", "guidance_scale", "negative_prompt"},
                                 exclude_none=True)
        return ImageOptions.model_validate({**fields, "response_format": "b64_json"})


class TextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(_Open):
    format: TextFormat | None = None


class ResponsesRequest(_Open):
    model: str = Field(min_length=1)
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    background: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # extension (vLLM's)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # extension (vLLM's)
    text: TextOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None

    @field_validator("input")
    @classmethod
    def _nonempty(cls, v: Any) -> Any:
        if isinstance(v, str) and not v:
            raise ValueError("must not be empty")
        return v
