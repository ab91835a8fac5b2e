"""server/logs.py: whatever a client manages to put in a record's message or fields (unknown field names with
newlines, escape sequences, megabytes of names), both formatters write one bounded line per record."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from server.logs import MAX_ITEMS, MAX_VALUE_CHARS, JsonFormatter, TextFormatter, bound, configure_logging, escape


def _record(msg: str = "request has fields this gateway ignores", fields=None, exc_info=None,
            args: tuple = ()) -> logging.LogRecord:
    record = logging.LogRecord("mgm.gateway", logging.INFO, __file__, 1, msg, args, exc_info)
    if fields is not None:
        record.fields = fields
    return record


FORGED = "x\n12:00:00 ERROR   mgm.gateway: forged line\r\x1b[31mred\x1b[0m\u2028sep\x00"


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_control_characters_never_split_a_record(formatter):
    out = formatter.format(_record(f"msg {FORGED}", {f"k{FORGED}": FORGED, "names": [FORGED, "ok"]}))
    assert out.splitlines() == [out]
    assert not any(c in out for c in "\n\r\x1b\x00\u2028")


def test_text_format_escapes_repr_style():
    out = TextFormatter().format(_record(fields={"fields": "a\nb,c\x1b[2J", "bad\nkey": 1}))
    assert out.endswith(r" fields=a\nb,c\x1b[2J bad\nkey=1")
    assert escape("tab\there \u2028 \x7f") == r"tab\there \u2028 \x7f"
    assert escape("plain ünïcode = fine") == "plain ünïcode = fine"


def test_json_format_keeps_values_and_escapes_in_json():
    out = JsonFormatter().format(_record(fields={"fields": "a\nb", "n": 3, "ok": True, "none": None}))
    entry = json.loads(out)
    assert entry["fields"] == "a\nb" and entry["n"] == 3 and entry["ok"] is True and entry["none"] is None
    assert entry["msg"] == "request has fields this gateway ignores" and entry["level"] == "info"


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_long_values_are_cut_with_an_ellipsis(formatter):
    names = ",".join(f"field{i}" for i in range(100_000))  # what chat.py logs: the names, comma-joined
    out = formatter.format(_record("m" * 5000, {"fields": names}))
    assert len(out) < 2 * MAX_VALUE_CHARS + 500
    assert ("…" in out or r"\u2026" in out) and "field0,field1," in out and "field99999" not in out


def test_lists_are_capped_with_plus_n_more():
    names = [f"f{i}" for i in range(MAX_ITEMS + 25)]
    entry = json.loads(JsonFormatter().format(_record(fields={"fields": names})))
    assert entry["fields"] == names[:MAX_ITEMS] + ["+25 more"]
    text = TextFormatter().format(_record(fields={"fields": names}))
    assert text.endswith("fields=" + ",".join(names[:MAX_ITEMS]) + ",+25 more")
    assert bound(tuple(range(3))) == [0, 1, 2] and bound({"a": "x" * 2000})["a"].startswith("x" * MAX_VALUE_CHARS)
    assert len(bound({"a": "x" * 2000})["a"]) < MAX_VALUE_CHARS + 30


def test_many_fields_are_capped():
    fields = {f"k{i}": i for i in range(500)}
    entry = json.loads(JsonFormatter().format(_record(fields=fields)))
    assert entry["+more"] == 400 and "k99" in entry and "k100" not in entry


def test_other_values_print_as_before():
    class Key:
        def __str__(self) -> str:
            return "BatchKey(width=64, height=64)"

    assert TextFormatter().format(_record(fields={"key": Key(), "s": 1.5})).endswith(
        " key=BatchKey(width=64, height=64) s=1.5")
    assert json.loads(JsonFormatter().format(_record(fields={"key": Key()})))["key"] == "BatchKey(width=64, height=64)"
    assert TextFormatter().format(_record("%s + %d", args=("a", 1))).endswith("mgm.gateway: a + 1")


def test_tracebacks_follow_on_indented_lines():
    try:
        raise ValueError("bad\n12:00:00 INFO    forged: line")
    except ValueError:
        exc_info = sys.exc_info()
    text = TextFormatter().format(_record("failed", exc_info=exc_info))
    first, *rest = text.split("\n")
    assert first.endswith("mgm.gateway: failed") and rest
    assert all(line.startswith("    ") for line in rest)  # no continuation line looks like a record
    entry = json.loads(JsonFormatter().format(_record("failed", exc_info=exc_info)))
    assert "ValueError" in entry["exc"] and len(JsonFormatter().format(_record("failed", exc_info=exc_info))
                                                .splitlines()) == 1


def test_configure_logging_installs_one_handler():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("debug", "json")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
