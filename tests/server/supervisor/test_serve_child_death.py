"""A child of `mgm serve` that dies on its own: serve logs it, stops every other child and exits non-zero, leaving
no process behind (the killed engine's own child, vLLM's engine core, included)."""

from __future__ import annotations

import os
import signal
import time

from support.serve_live import VLLM_ARGS, leftovers, start_serve

from server.procs import free_port, group_members


def test_killed_child_stops_everything(tiny_models, tmp_path):  # type: ignore[no-untyped-def]
    model, image_model = tiny_models
    serve = start_serve(tmp_path, "--model", str(model), "--image-model", str(image_model), "--port", str(free_port()),
                        "--stop-timeout", "20", *VLLM_ARGS)
    try:
        serve.wait_for(lambda: {"engine-0", "sdxl-worker-0", "gateway"} <= set(serve.children()), 60, "children")
        children = serve.children()
        engine = children["engine-0"]
        # Wait until vLLM has started its engine-core process (a second member of the engine's group), then kill
        # only the API server: its engine core would be orphaned unless serve stops the whole group.
        serve.wait_for(lambda: len(group_members(engine)) >= 2, 120, "vLLM engine core process")
        os.kill(engine, signal.SIGKILL)
        start = time.monotonic()
        assert serve.wait_exit(60) == 1, serve.logs()
        assert time.monotonic() - start < 60
        err = serve.stderr()
        assert "exited unexpectedly" in err and "child=engine-0" in err, serve.logs()
        assert leftovers(children.values()) == [], serve.logs()
    finally:
        if serve.proc.poll() is None:
            serve.stop()
