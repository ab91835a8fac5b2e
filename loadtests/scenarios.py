"""Request mixes the load generator sends: each scenario maps a request index to a :class:`loadtests.client.Request`.

Every chat request carries its own image (distinct pixels, so no cache on either side can reuse an encoding) and a
fixed output length (``max_tokens`` with ``ignore_eos``), so that each system under test does the same work per
request. Images are encoded before the timed part starts.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from loadtests.client import Request

SCENARIOS = ("text", "image", "image-nostream", "hd", "images", "mixed", "responses")
#: The mixed any-to-any scenario, per 20 requests: kind → count (interleaved, see :func:`mixed_kind`).
MIX = {"chat-image": 10, "chat-text": 4, "any-to-any": 3, "images": 3}


def png_data_url(seed: int, size: int) -> str:
    """A distinct random-noise RGB PNG of ``size``×``size`` as a data URL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mix_cycle() -> list[str]:
    """One cycle of :data:`MIX` by smooth weighted round-robin: every kind spread evenly, none in runs."""
    total, current, out = sum(MIX.values()), dict.fromkeys(MIX, 0), []
    for _ in range(total):
        for kind, weight in MIX.items():
            current[kind] += weight
        pick = max(current, key=lambda k: current[k])
        current[pick] -= total
        out.append(pick)
    return out


def mixed_kind(i: int) -> str:
    """Kind of request ``i`` in the mixed scenario."""
    cycle = _mix_cycle()
    return cycle[i % len(cycle)]


@dataclass
class Scenario:
    name: str
    model: str
    max_tokens: int = 32
    image_size: int = 64
    image_model: str = "sdxl"
    sdxl_size: int = 64
    sdxl_steps: int = 4
    seed: int = 0
    store: bool = True  # responses: keep each response in the gateway's store (the API's default)

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.name!r}; choose from {', '.join(SCENARIOS)}")
        self._images: dict[int, str] = {}

    def prepare(self, n: int) -> None:
        """Encode the images of requests 0..n-1 now, outside the timed part."""
        for i in range(n):
            self._image(i)

    def _image(self, i: int) -> str:
        if i not in self._images:
            self._images[i] = png_data_url(self.seed * 1_000_003 + i, self.image_size)
        return self._images[i]

    def _chat(self, kind: str, content: object, *, stream: bool = True, **extra: object) -> Request:
        body: dict[str, object] = {
            "model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream, **extra}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return Request(kind, "/v1/chat/completions", body)

    def _image_chat(self, i: int, kind: str, stream: bool = True) -> Request:
        return self._chat(kind, [{"type": "image_url", "image_url": {"url": self._image(i)}},
                                 {"type": "text", "text": f"Describe picture {i} in detail."}], stream=stream)

    def _responses(self, i: int) -> Request:
        """The image scenario's request through ``/v1/responses``: the same image, text and output length."""
        return Request("responses", "/v1/responses", {
            "model": self.model, "stream": True, "store": self.store, "max_output_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True, "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": self._image(i)},
                {"type": "input_text", "text": f"Describe picture {i} in detail."}]}]})

    def _images_api(self, i: int, enhance: bool) -> Request:
        return Request("images", "/v1/images/generations", {
            "model": self.image_model, "prompt": f"a lighthouse at dusk, painting number {i}", "n": 1,
            "size": f"{self.sdxl_size}x{self.sdxl_size}", "response_format": "b64_json", "seed": i,
            "num_inference_steps": self.sdxl_steps, "enhance_prompt": enhance})

    def request(self, i: int) -> Request:
        if self.name == "text":
            return self._chat("chat-text", f"Tell me a story about the number {i}.")
        if self.name in ("image", "hd"):
            return self._image_chat(i, f"chat-{self.name}")
        if self.name == "image-nostream":
            return self._image_chat(i, "chat-image", stream=False)
        if self.name == "images":
            return self._images_api(i, enhance=False)
        if self.name == "responses":
            return self._responses(i)
        kind = mixed_kind(i)
        if kind == "chat-image":
            return self._image_chat(i, kind)
        if kind == "chat-text":
            return self._chat(kind, f"Tell me a story about the number {i}.")
        if kind == "any-to-any":
            return self._chat(kind, f"Draw a red fox number {i} in the snow.", modalities=["text", "image"],
                              image_options={"size": f"{self.sdxl_size}x{self.sdxl_size}",
                                             "num_inference_steps": self.sdxl_steps, "seed": i})
        return self._images_api(i, enhance=True)
