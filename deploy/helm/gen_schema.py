"""Generate the chart's values.schema.json from the annotated values.yaml.

    python deploy/helm/gen_schema.py            # rewrite values.schema.json
    python deploy/helm/gen_schema.py --check    # exit 1 when the committed schema is stale

The annotation syntax is described at the top of values.yaml. In short: every key's schema is inferred from its
default (type; a non-empty mapping lists its keys and refuses unknown ones, so typos fail), the comment block right
above the key becomes its ``description``, and ``# @schema`` lines (or a block fenced by two ``# @schema`` lines) add
JSON Schema keywords written as YAML. ``required: true`` in an annotation puts the key in its parent's ``required``.
A mapping annotated with ``additionalProperties`` other than ``false`` is open: only its annotated keys are listed. A
key annotated with ``$ref`` is the referenced schema and nothing is inferred below it. A block fenced by
``# @schema-root`` holds root keywords (``$schema``, ``definitions``, cross-key ``allOf`` …).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "minigemini"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
COMMAND = "python deploy/helm/gen_schema.py"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
_COMMENT = re.compile(r"^ *#(?P<text>.*)$")
_FENCES = {"@schema": "key", "@schema-root": "root"}
Path_ = tuple[str, ...]


class AnnotationError(ValueError):
    """values.yaml breaks the annotation rules (message names the line or key)."""


@dataclass
class Entry:
    description: str = ""
    annotation: dict[str, Any] = field(default_factory=dict)


def _yaml_mapping(text: str, where: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise AnnotationError(f"{where}: an annotation must be a YAML mapping, got {text!r}")
    return loaded


def _merge(into: dict[str, Any], extra: dict[str, Any], where: str) -> None:
    clash = into.keys() & extra.keys()
    if clash:
        raise AnnotationError(f"{where}: {sorted(clash)} annotated twice")
    into.update(extra)


def parse(text: str) -> tuple[dict[Path_, Entry], dict[str, Any]]:
    """Comments and annotations of every block-style key (by path), and the root annotation."""
    entries: dict[Path_, Entry] = {}
    root: dict[str, Any] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    description: list[str] = []
    annotation: dict[str, Any] = {}
    fence: tuple[str, int, list[str]] | None = None  # (kind, first line, body)
    list_owner: int | None = None  # indent of the key whose list items are being skipped

    for n, line in enumerate(text.splitlines(), 1):
        comment = _COMMENT.match(line)
        body = comment["text"].removeprefix(" ") if comment else None
        if fence:
            kind, start, lines = fence
            if body is not None and body.strip() in _FENCES:
                if _FENCES[body.strip()] != kind:
                    raise AnnotationError(f"values.yaml:{n}: {body.strip()} closes a block opened at line {start}")
                fenced = _yaml_mapping("\n".join(lines), f"values.yaml:{start}")
                _merge(root if kind == "root" else annotation, fenced, f"values.yaml:{start}")
                fence = None
            elif body is None:
                raise AnnotationError(f"values.yaml:{start}: @schema block not closed")
            else:
                lines.append(body)
            continue
        if body is not None:
            stripped = body.strip()
            if stripped in _FENCES:
                fence = (_FENCES[stripped], n, [])
            elif stripped.startswith("@schema "):
                _merge(annotation, _yaml_mapping(stripped.removeprefix("@schema "), f"values.yaml:{n}"),
                       f"values.yaml:{n}")
            elif stripped.startswith("@"):
                raise AnnotationError(f"values.yaml:{n}: unknown annotation {stripped.split()[0]}")
            else:
                description.append(stripped)
            continue
        if not line.strip():
            if annotation:
                raise AnnotationError(f"values.yaml:{n}: an annotation must stand right above its key")
            description = []
            continue
        indent = len(line) - len(line.lstrip(" "))
        if list_owner is not None and indent > list_owner:
            continue  # inside a list item: documented by the list's key
        list_owner = None
        key = _KEY.match(line)
        if line.lstrip().startswith("- ") or not key:
            if annotation:
                raise AnnotationError(f"values.yaml:{n}: annotations go on mapping keys, not list items")
            list_owner = stack[-1][0] if stack else -1
            description = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), key["key"])
        entries[path] = Entry(" ".join(description), annotation)
        stack.append((indent, key["key"]))
        description, annotation = [], {}
    if fence:
        raise AnnotationError(f"values.yaml:{fence[1]}: @schema block not closed")
    return entries, root


def _type(value: Any) -> str | None:
    for python, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                         (list, "array"), (dict, "object")):
        if isinstance(value, python):
            return name
    return None


def _build(value: Any, path: Path_, entries: dict[Path_, Entry]) -> dict[str, Any]:
    entry = entries.get(path, Entry())
    annotation = {k: v for k, v in entry.annotation.items() if not (k == "required" and isinstance(v, bool))}
    schema: dict[str, Any] = {"description": entry.description} if entry.description else {}
    if "$ref" in annotation:  # the referenced schema is the whole truth; nothing inferred below
        return schema | annotation
    inferred = _type(value)
    if inferred and "const" not in annotation:
        schema["type"] = inferred
    if not isinstance(value, dict):
        return schema | annotation
    explicit = annotation.pop("properties", {})
    closed = annotation.get("additionalProperties", False if value else True) is False
    properties = {k: _build(v, (*path, k), entries) for k, v in value.items()
                  if closed or entries.get((*path, k), Entry()).annotation}
    required = [k for k in properties if entries.get((*path, k), Entry()).annotation.get("required") is True]
    schema |= annotation
    if properties or explicit:
        schema["properties"] = properties | explicit
    if closed and value:
        schema["additionalProperties"] = False
    if required:
        schema["required"] = [*schema.get("required", []), *required]
    return schema


def generate(text: str) -> dict[str, Any]:
    """The schema for values.yaml's text; raises AnnotationError on a broken annotation or an undocumented key."""
    entries, root = parse(text)
    values = yaml.safe_load(text)
    under_ref = {p for p in entries if any("$ref" in entries[p[:i]].annotation for i in range(1, len(p)))}
    ignored = [".".join(p) for p in under_ref if entries[p].annotation]
    if ignored:
        raise AnnotationError("annotations below a $ref key have no effect: " + ", ".join(ignored))
    undocumented = [".".join(p) for p, entry in entries.items() if not entry.description and p not in under_ref]
    if undocumented:
        raise AnnotationError("keys without a comment above them: " + ", ".join(undocumented))
    body = _build(values, (), entries)
    head = {k: root.pop(k) for k in ("$schema", "title") if k in root}
    extra = root.pop("properties", {})
    return head | body | {"properties": body["properties"] | extra} | root


def render(text: str) -> str:
    return json.dumps(generate(text), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when values.schema.json is not up to date")
    args = parser.parse_args(argv)
    fresh = render(VALUES.read_text())
    if args.check:
        if SCHEMA.read_text() != fresh:
            print(f"{SCHEMA} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
