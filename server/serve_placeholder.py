"""What `make serve` will run once the gateway exists (issue #4); until then it says so instead of pretending."""

import sys

PLAN = """\
`mgm serve` (OpenAI-compatible gateway + vLLM engine(s) + SDXL worker pool) is not built yet.
When it is, `make serve` will run:

    .venv/bin/mgm serve --host 127.0.0.1 --port 8000

which builds the tiny random-weight checkpoints under .cache/ if missing, starts the engine(s), the SDXL
worker(s) and the gateway, and prints a ready-to-paste curl command.

Available today:
    .venv/bin/mgm build-tiny .cache/tiny-mgm          # a random-weight MGM checkpoint in the official layout
    .venv/bin/python -m kernels.bench                  # patch-info-mining benchmark
"""

if __name__ == "__main__":
    print(PLAN)
    sys.exit(1)
