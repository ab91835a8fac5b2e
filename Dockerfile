# syntax=docker/dockerfile:1.7
# minigemini-serve, CUDA image: the official vLLM OpenAI image (pinned to the `gpu` extra's vLLM) with this project
# installed on top. One image, three roles, chosen by the command:
#   docker run … IMAGE engine --model /models/MGM-7B-HD      (vLLM + the MGM plugin, port 8000)
#   docker run … IMAGE sdxl-worker --model /models/sdxl      (port 8100)
#   docker run … IMAGE gateway --engine http://engine:8000   (port 8000)
# and `IMAGE serve` (the default) runs all three as child processes. CPU variant: Dockerfile.cpu.
#
# The base keeps its CUDA toolchain: Triton and FlashInfer compile kernels at run time. This file adds no compiler,
# no package cache and no source tree: the project is built into a wheel in a throw-away stage.

# Keep in step with pyproject.toml (`gpu` extra: vllm==…, project version); tests/deploy checks both.
ARG VLLM_VERSION=0.33.0
ARG MGM_VERSION=0.1.0

FROM vllm/vllm-openai:v${VLLM_VERSION} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY server ./server
COPY loadtests ./loadtests
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM vllm/vllm-openai:v${VLLM_VERSION}
ARG VLLM_VERSION
ARG MGM_VERSION
ARG VCS_REF=unknown
# The extras installed with the project; `--build-arg EXTRAS=` skips the gpu extra's xformers (SDXL then uses
# PyTorch SDPA attention).
ARG EXTRAS=gpu

LABEL org.opencontainers.image.title="minigemini-serve" \
      org.opencontainers.image.description="Mini-Gemini (MGM) inference server: vLLM engine with the MGM plugin, SDXL worker, OpenAI-compatible gateway" \
      org.opencontainers.image.version="${MGM_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/vllm/vllm-openai:v${VLLM_VERSION}"

# The base's CUDA builds (torch family, Triton, vLLM, FlashInfer, xformers) are frozen as constraints: installing the
# project can add packages but never replace them (an unpinned xformers would otherwise pull another torch).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python3 -m pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|vllm|flashinfer-python|xformers|numpy)==' \
      > /tmp/base-constraints.txt \
    && grep -q '^vllm==' /tmp/base-constraints.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/base-constraints.txt \
         "$(ls /wheels/minigemini_serve-${MGM_VERSION}-*.whl)${EXTRAS:+[${EXTRAS}]}" \
    && rm -f /tmp/base-constraints.txt \
    && python3 -c "import vllm, sys; sys.exit(vllm.__version__.split('+')[0] != '${VLLM_VERSION}')"

# Non-root user; /models is where checkpoints and the Hugging Face cache live (mount a volume there).
RUN groupadd --gid 10001 mgm \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mgm --shell /usr/sbin/nologin mgm \
    && mkdir -p /models \
    && chown 10001:10001 /models

ENV HF_HOME=/models/huggingface \
    MGM_CACHE_DIR=/models/cache \
    MGM_HOST=0.0.0.0 \
    MGM_GATEWAY_HOST=0.0.0.0 \
    MGM_SDXL_HOST=0.0.0.0 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /home/mgm
EXPOSE 8000 8100
ENTRYPOINT ["mgm"]
CMD ["serve"]
