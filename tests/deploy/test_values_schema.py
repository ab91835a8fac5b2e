"""values.schema.json is generated from the annotated values.yaml (deploy/helm/gen_schema.py): the committed file
matches the generator's output, and the generator refuses what would silently lose a rule or a key's documentation."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_schema", ROOT / "deploy" / "helm" / "gen_schema.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def test_committed_schema_is_generated_from_values() -> None:
    fresh = gen.render(gen.VALUES.read_text())
    assert gen.SCHEMA.read_text() == fresh, f"values.schema.json is stale: run `{gen.COMMAND}` and commit it"


def test_check_mode_reports_a_stale_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "values.schema.json"
    stale.write_text("{}\n")
    monkeypatch.setattr(gen, "SCHEMA", stale)
    assert gen.main(["--check"]) == 1
    assert gen.COMMAND in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0


ANNOTATED = """\
# @schema-root
# $schema: http://json-schema.org/draft-07/schema#
# definitions: {port: {type: integer, minimum: 1, maximum: 65535}}
# @schema-root

# The server.
server:
  # Listening port.
  # @schema {$ref: "#/definitions/port", required: true}
  port: 8000
  # Replicas.
  # @schema minimum: 1
  # @schema maximum: 9
  replicas: 2
  # Pod labels.
  # @schema additionalProperties: {type: string}
  labels: {}
  # Any securityContext field; only the annotated ones are checked.
  # @schema additionalProperties: true
  securityContext:
    # Must stay true.
    # @schema const: true
    runAsNonRoot: true
    # Not annotated: not listed.
    fsGroup: 1
  # Extra flags.
  # @schema
  # items:
  #   type: string
  # @schema
  args: []
"""


def test_inference_and_annotations() -> None:
    schema = gen.generate(ANNOTATED)
    assert schema["$schema"].startswith("http://json-schema.org/draft-07")
    server = schema["properties"]["server"]
    assert server["description"] == "The server." and server["additionalProperties"] is False
    assert server["required"] == ["port"]
    props = server["properties"]
    assert props["port"] == {"description": "Listening port.", "$ref": "#/definitions/port"}
    assert props["replicas"] == {"description": "Replicas.", "type": "integer", "minimum": 1, "maximum": 9}
    assert props["labels"]["additionalProperties"] == {"type": "string"}
    assert list(props["securityContext"]["properties"]) == ["runAsNonRoot"]
    assert props["securityContext"]["properties"]["runAsNonRoot"]["const"] is True
    assert props["args"] == {"description": "Extra flags.", "type": "array", "items": {"type": "string"}}
    json.dumps(schema)  # plain JSON


@pytest.mark.parametrize(("text", "message"), [
    ("a: 1\n", "keys without a comment above them: a"),
    ("# A.\n# @schema minimum: 1\n\nb: 1\n", "right above its key"),
    ("# A.\n# @schema\n# minimum: 1\na: 1\n", "not closed"),
    ("# A.\n# @schema minimum: 1\n# @schema minimum: 2\na: 1\n", "annotated twice"),
    ("# A.\n# @schema [1, 2]\na: 1\n", "must be a YAML mapping"),
    ("# A.\n# @scheme minimum: 1\na: 1\n", "unknown annotation @scheme"),
    ("# A.\n# @schema $ref: '#/definitions/x'\na:\n  # B.\n  # @schema minimum: 1\n  b: 1\n", "below a $ref"),
])
def test_generator_refuses_broken_annotations(text: str, message: str) -> None:
    with pytest.raises(gen.AnnotationError, match=message.replace("$", r"\$")):
        gen.generate(text)
