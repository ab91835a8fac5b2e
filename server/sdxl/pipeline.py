"""Loading ``StableDiffusionXLPipeline`` for serving and running one batch of jobs through it.

Official usage (docs/mgm.md §7): ``StableDiffusionXLPipeline.from_pretrained(..., torch_dtype=float16)`` called as
``pipe(prompt, negative_prompt=common_neg_prompt)`` with diffusers' defaults (50 steps, guidance 5.0, 1024²). This
module keeps those semantics and adds what serving needs:

* dtype and weights: the official fp16 with the fp16 weight variant on CUDA (when the checkpoint ships it), fp32 on
  CPU (half precision is slow or unsupported there); ``--dtype bfloat16`` is one flag away;
* attention: PyTorch SDPA (diffusers' default processor), xFormers on CUDA when it is importable;
* VAE: SDXL's VAE overflows in fp16, so with fp16 weights it is kept in fp32 for good (no per-call up/down casts);
  slicing decodes a batch one image at a time, bounding the decoder's peak memory;
* batching: each job's text is encoded separately (``encode_prompt``), so jobs with different prompts, negative
  prompts (or none) share one denoising loop; every image gets its own CPU ``torch.Generator`` seeded ``seed + i``,
  so its starting noise does not depend on the batch it lands in or on the device;
* cancellation: ``callback_on_step_end`` raises :class:`BatchCancelled` once every job of the batch is cancelled
  (the pipeline's own ``_interrupt`` would still run the VAE decode); rows of cancelled jobs are not decoded;
* edits: img2img and inpainting pipelines are built from the loaded components (``from_pipe``: the same UNet, VAE
  and text encoders, no second copy of the weights); inpainting pastes the kept pixels of the input back over the
  decoded image (OpenAI's edits keep what the mask does not free; SDXL base's latent blending alone does not);
* previews: the same step callback turns the latents of the jobs that asked for them into small RGB previews with a
  linear latent→RGB map fitted at load time against this VAE (:func:`fit_preview_map`) — no decoder run, no extra
  model — at steps spread evenly before the end.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: MGM's negative prompt (``common_neg_prompt`` in the official ``mgm/serve/cli.py`` and ``model_worker.py``),
#: verbatim — including its repeated "out of frame".
OFFICIAL_NEGATIVE_PROMPT = (
    "out of frame, lowres, text, error, cropped, worst quality, low quality, jpeg artifacts, ugly, duplicate, "
    "morbid, mutilated, out of frame, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, "
    "deformed, blurry, dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross "
    "proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, too many "
    "fingers, long neck, username, watermark, signature"
)
#: diffusers' StableDiffusionXLPipeline defaults, which the official code relies on.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "sdpa", "xformers")


class BatchCancelled(Exception):
    """Every job of the running batch was cancelled; raised from the step callback to stop denoising at once."""


@dataclass(frozen=True)
class PipelineOptions:
    model: Path
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    variant: str | None = "auto"  # "fp16" for *.fp16.safetensors; "auto": see resolve_variant
    vae_slicing: bool = True
    threads: int | None = None  # CPU intra-op threads; 1 is much faster for tiny models on a busy machine


@dataclass(frozen=True)
class GenSpec:
    """One job as the pipeline sees it; ``seeds`` has one entry per image. ``image`` (PIL RGB, at the batch's size)
    for img2img and inpainting; ``mask`` (PIL "L", white = repaint) for inpainting; ``previews``: how many previews
    of each image the job wants."""

    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    image: Any = None
    mask: Any = None
    previews: int = 0


#: ``on_preview(spec index, preview index, one PIL image per seed)``, called on the inference thread.
PreviewSink = Callable[[int, int, list[Any]], None]


def preview_steps(total: int, previews: int) -> dict[int, list[int]]:
    """Completed step (1-based) → the preview indices due after it: preview j after step ⌈(j+1)·total/(k+1)⌉, so k
    previews are spread evenly before the end (several land on one step when there are fewer steps than previews)."""
    due: dict[int, list[int]] = {}
    for j in range(previews):
        due.setdefault(max(1, -(-(j + 1) * total // (previews + 1))), []).append(j)
    return due


def fit_preview_map(vae: Any, scaling_factor: float, size: int = 128, samples: int = 6) -> tuple[Any, Any]:
    """A least-squares linear map from the denoising loop's latents (4 channels, scaled) to RGB in [0, 1], fitted
    for this VAE: smooth random colour fields are encoded, and each latent pixel is matched with the mean colour of
    the 8×8 block it covers. Returns (weights 4×3, bias 3), float32 on the CPU."""
    import torch

    g = torch.Generator("cpu").manual_seed(0)
    coarse = torch.rand(samples, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    images = images.clamp(0, 1)
    param = next(vae.parameters())
    with torch.inference_mode():
        latents = vae.encode((images * 2 - 1).to(param.device, param.dtype)).latent_dist.mean.float().cpu()
    latents = latents * scaling_factor
    factor = size // latents.shape[-1]
    targets = torch.nn.functional.avg_pool2d(images, factor)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(x1, y).solution  # (5, 3)
    return solution[:-1].contiguous(), solution[-1].contiguous()


@dataclass
class BatchResult:
    images: list[list[Any] | None]  # per spec: PIL images, or None when that job was cancelled
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":  # the official pipeline's fp16 on a GPU (its VAE runs upcast, below); CPUs have no fp16 path
        return torch.float16 if device == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "float16" and device == "cpu":
        raise ValueError("float16 is not supported on CPU; use float32 or bfloat16")
    return getattr(torch, dtype)


def resolve_variant(variant: str | None, model: Path | str, dtype: Any) -> str | None:
    """``auto``: the official ``variant="fp16"`` when running fp16 and the checkpoint ships ``*.fp16.*`` weights
    (half the download and load), else the full-precision files; anything else is used as given."""
    import torch

    if variant != "auto":
        return variant
    if dtype == torch.float16 and any(Path(model).glob("*/*.fp16.safetensors")):
        return "fp16"
    return None


def route_library_logs() -> None:
    """Send diffusers'/transformers' warnings through the root logger (so ``--log-format json`` covers them) and
    drop their progress bars, which would interleave with structured log lines."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.disable_default_handler()
        lib.enable_propagation()
        lib.disable_progress_bar()
        lib.set_verbosity_warning()


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); older releases know only the old one."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


class SDXLRunner:
    """A loaded pipeline plus the serving policy above. Not thread-safe: one inference thread owns it."""

    def __init__(self, options: PipelineOptions) -> None:
        import torch
        from diffusers import StableDiffusionXLPipeline

        self.options = options
        if options.threads:
            torch.set_num_threads(options.threads)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        start = time.perf_counter()
        kwargs: dict[str, Any] = {_dtype_kwarg(): self.dtype, "use_safetensors": True}
        # Without accelerate, diffusers would warn on every load that it falls back to this.
        kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
        if variant := resolve_variant(options.variant, options.model, self.dtype):
            kwargs["variant"] = variant
        pipe = StableDiffusionXLPipeline.from_pretrained(str(options.model), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(self.device)
        # fp16 only: bf16 has fp32's exponent range, and a VAE that declares itself fp16-safe (force_upcast=False,
        # e.g. madebyollin/sdxl-vae-fp16-fix) is left alone.
        self.vae_upcast = self.dtype == torch.float16 and bool(getattr(pipe.vae.config, "force_upcast", True))
        if self.vae_upcast:
            pipe.vae.to(torch.float32)
        if options.vae_slicing:
            pipe.vae.enable_slicing()
        self.attention = self._set_attention(pipe, options.attention)
        if self.device == "cuda":
            pipe.unet.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
        self.pipe = pipe
        # Edit pipelines share every component with `pipe` (from_pipe): same UNet, VAE, encoders, scheduler config.
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        self.pipes = {"text2img": pipe, "img2img": AutoPipelineForImage2Image.from_pipe(pipe),
                      "inpaint": AutoPipelineForInpainting.from_pipe(pipe)}
        for p in self.pipes.values():
            p.set_progress_bar_config(disable=True)
        self.preview_map = fit_preview_map(pipe.vae, pipe.vae.config.scaling_factor)
        self.default_size = pipe.default_sample_size * pipe.vae_scale_factor
        self.load_s = time.perf_counter() - start
        self.cfg_possible = pipe.unet.config.time_cond_proj_dim is None

    def _set_attention(self, pipe: Any, attention: str) -> str:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        has_xformers = importlib.util.find_spec("xformers") is not None
        if attention == "auto":
            attention = "xformers" if self.device == "cuda" and has_xformers else "sdpa"
        if attention == "xformers":
            if self.device != "cuda" or not has_xformers:
                raise ValueError("attention 'xformers' needs CUDA and the xformers package")
            pipe.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            # diffusers' default already; set explicitly so a checkpoint cannot bring another processor.
            pipe.unet.set_attn_processor(AttnProcessor2_0())
            pipe.vae.set_attn_processor(AttnProcessor2_0())
        return attention

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": str(self.dtype).removeprefix("torch."), "attention": self.attention,
                "vae_dtype": str(self.pipe.vae.dtype).removeprefix("torch."), "vae_slicing": self.options.vae_slicing,
                "default_size": self.default_size, "load_s": round(self.load_s, 3), "modes": list(self.pipes),
                "preview": "linear-latent-rgb"}

    def preview(self, latents: Any) -> list[Any]:
        """Cheap RGB previews of loop latents (B, 4, h, w), at latent resolution (PIL)."""
        import torch
        from PIL import Image

        weights, bias = self.preview_map
        with torch.inference_mode():
            rgb = torch.einsum("bchw,cd->bhwd", latents.detach().float().cpu(), weights) + bias
            pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return [Image.fromarray(p) for p in pixels]

    def generate(self, specs: Sequence[GenSpec], *, width: int, height: int, steps: int, guidance_scale: float,
                 cancelled: Callable[[int], bool] = lambda i: False, mode: str = "text2img", strength: float = 1.0,
                 on_preview: PreviewSink | None = None) -> BatchResult:
        """Run the jobs ``specs`` (same size/steps/guidance/mode/strength) as one pipeline call.

        ``cancelled(i)`` is polled after each denoising step; when it is true for every spec the call stops with
        :class:`BatchCancelled`, otherwise cancelled specs get ``None`` instead of images. Specs asking for previews
        get them through ``on_preview`` (upsampled to the batch's size).
        """
        import torch

        pipe = self.pipe
        cfg = guidance_scale > 1.0 and self.cfg_possible
        t0 = time.perf_counter()
        with torch.inference_mode():
            parts = [pipe.encode_prompt(spec.prompt, device=pipe._execution_device,
                                        num_images_per_prompt=len(spec.seeds), do_classifier_free_guidance=cfg,
                                        negative_prompt=spec.negative_prompt)
                     for spec in specs]
        embeds, neg, pooled, neg_pooled = ([p[k] for p in parts] for k in range(4))
        generators = [torch.Generator("cpu").manual_seed(seed) for spec in specs for seed in spec.seeds]
        t1 = time.perf_counter()

        rows_of = []  # spec index → its rows in the batch
        offset = 0
        for spec in specs:
            rows_of.append(range(offset, offset + len(spec.seeds)))
            offset += len(spec.seeds)

        def on_step_end(p: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if all(cancelled(i) for i in range(len(specs))):
                raise BatchCancelled
            if on_preview is not None:
                for i, spec in enumerate(specs):
                    due = preview_steps(p.num_timesteps, spec.previews).get(step + 1) if spec.previews else None
                    if due and not cancelled(i):
                        small = self.preview(tensors["latents"][list(rows_of[i])])
                        images = [im.resize((width, height), resample=2) for im in small]  # 2: bilinear
                        for j in due:
                            on_preview(i, j, images)
            return {}

        extra: dict[str, Any] = {}
        if mode != "text2img":  # each row starts from its job's image (and mask)
            extra["image"] = [spec.image for spec in specs for _ in spec.seeds]
            extra["strength"] = strength
        if mode == "inpaint":
            extra["mask_image"] = [spec.mask for spec in specs for _ in spec.seeds]
        if mode != "img2img":  # img2img takes its size from the image
            extra.update(width=width, height=height)
        out = self.pipes[mode](
            prompt_embeds=torch.cat(embeds),
            pooled_prompt_embeds=torch.cat(pooled),
            negative_prompt_embeds=torch.cat(neg) if cfg else None,
            negative_pooled_prompt_embeds=torch.cat(neg_pooled) if cfg else None,
            num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=generators, output_type="latent", callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"], **extra,
        )
        latents = out.images
        t2 = time.perf_counter()
        # Decode only the rows of jobs that still have a client.
        keep = [i for i in range(len(specs)) if not cancelled(i)]
        rows: list[int] = []
        offset = 0
        for i, spec in enumerate(specs):
            if i in keep:
                rows.extend(range(offset, offset + len(spec.seeds)))
            offset += len(spec.seeds)
        images: list[list[Any] | None] = [None] * len(specs)
        if rows:
            decoded = self._decode(latents[rows])
            pos = 0
            for i in keep:
                images[i] = decoded[pos:pos + len(specs[i].seeds)]
                pos += len(specs[i].seeds)
                if mode == "inpaint":  # the pixels the mask keeps are the input's own
                    from PIL import Image

                    images[i] = [Image.composite(im, specs[i].image, specs[i].mask) for im in images[i]]
        t3 = time.perf_counter()
        return BatchResult(images=images, encode_s=t1 - t0, denoise_s=t2 - t1, decode_s=t3 - t2)

    def _decode(self, latents: Any) -> list[Any]:
        """The pipeline's own decode step (latent de-normalisation, VAE, watermark, postprocess) for a subset of
        rows, with the VAE in its serving dtype (fp32 when the UNet runs in fp16)."""
        import torch

        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        with torch.inference_mode():
            if mean is not None and std is not None:
                mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std_t / vae.config.scaling_factor + mean_t
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
            if self.pipe.watermark is not None:
                image = self.pipe.watermark.apply_watermark(image)
            return self.pipe.image_processor.postprocess(image, output_type="pil")
