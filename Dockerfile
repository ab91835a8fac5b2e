# minigemini-serve container image: defined by the deployment issue (CUDA image on the official vLLM OpenAI base,
# a CPU variant, non-root, roles `mgm engine` / `mgm sdxl-worker` / `mgm gateway`). Not buildable yet.
