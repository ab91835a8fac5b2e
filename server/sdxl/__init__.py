"""SDXL side of the any-to-any server: a tiny random SDXL checkpoint for CPU tests and the ``mgm sdxl-worker``.

Modules (heavy imports — torch, diffusers — happen inside them, never here, so ``mgm --help`` stays fast):

* :mod:`server.sdxl.tiny` — ``build_tiny_sdxl``: seeded random SDXL pipeline saved with ``save_pretrained``.
* :mod:`server.sdxl.batching` — pure FIFO-fair batch scheduler (no torch).
* :mod:`server.sdxl.pipeline` — loading ``StableDiffusionXLPipeline`` (dtype, attention, VAE) and running one batch.
* :mod:`server.sdxl.worker` — the FastAPI app: job API, queue, cancellation, health and metrics.
* :mod:`server.sdxl.cli` — options and handlers of ``mgm build-tiny-sdxl`` and ``mgm sdxl-worker``.
"""
