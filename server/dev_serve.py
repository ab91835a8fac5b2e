"""`make serve` until `mgm serve` (gateway + engines + SDXL pool) exists: one MGM engine, tiny checkpoint by default.

    python -m server.dev_serve [--model DIR] [--host 127.0.0.1] [--port 8000]

Builds the tiny random-weight checkpoint under .cache/ when no --model is given, starts `mgm engine` (vLLM's
OpenAI server with the MGM plugin), waits until it answers, prints the URL and a curl command with an image, and
stops the engine on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TINY = Path(".cache/tiny-mgm")


def _png_data_url() -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curl(base: str, model: str) -> str:
    body = ('{"model": "%s", "max_tokens": 32, "messages": [{"role": "user", "content": ['
            '{"type": "image_url", "image_url": {"url": "%s"}}, '
            '{"type": "text", "text": "What is in this picture?"}]}]}') % (model, _png_data_url())
    return f"curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=os.environ.get("MGM_MODEL") or None,
                    help="MGM checkpoint (default: $MGM_MODEL or the tiny random-weight one under .cache/)")
    ap.add_argument("--host", default=os.environ.get("MGM_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("MGM_PORT", "8000")))
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        model = TINY
        print(f"[mgm] using the tiny checkpoint {TINY}: RANDOM WEIGHTS, it answers gibberish by design", flush=True)
        if not (TINY / "config.json").exists():
            from engine.tiny import build_tiny
            build_tiny(TINY, backbone="llama", hd=False, seed=0, progress=True)
    base = f"http://{args.host}:{args.port}"
    cmd = [sys.executable, "-m", "server", "engine", "--model", str(model), "--host", args.host, "--port",
           str(args.port), "--max-model-len", "2048", "--limit-mm-per-prompt", '{"image": 4}']
    print("[mgm] starting:", " ".join(cmd), flush=True)
    child = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum: int, _frame: object) -> None:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    from rich.console import Console
    deadline = time.monotonic() + 600
    with Console(stderr=True).status("[mgm] waiting for the engine to load…"):
        while not _ready(base):
            if child.poll() is not None:
                print(f"[mgm] the engine exited with status {child.returncode}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                stop(signal.SIGTERM, None)
                print("[mgm] the engine did not become ready within 10 minutes", file=sys.stderr)
                return 1
            time.sleep(1)
    print(f"\n[mgm] ready: {base}/v1 (OpenAI-compatible; engine only — the gateway and the SDXL pool come with "
          f"`mgm serve`)\n\n{_curl(base, str(model))}\n", flush=True)
    child.wait()
    return 0 if child.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else child.returncode


if __name__ == "__main__":
    sys.exit(main())
