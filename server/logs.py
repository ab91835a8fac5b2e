"""Log setup of every ``mgm`` subcommand: one line per record on stderr, as JSON or as text.

Structured fields travel as ``extra={"fields": {...}}``; both formats print them (JSON merges them into the object,
text appends ``key=value`` pairs), so a log line reads the same to a person and to a log pipeline.

Fields may carry what clients sent (the names of unknown request fields, say), so the formatters bound and escape
them whatever the caller passed: a string value keeps at most :data:`MAX_VALUE_CHARS` characters (then ``…``), a list
at most :data:`MAX_ITEMS` items (then ``+N more``), and the text format escapes control characters (``\n`` → ``\\n``,
``\x1b`` → ``\\x1b``) in the message, the keys and the values, so every record is one line (a traceback follows
on lines that start with spaces, which no record does). JSON escapes control characters by itself.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

MAX_VALUE_CHARS = 1000  # per string (field value, message); longer ones end in "…"
MAX_KEY_CHARS = 100  # per field name
MAX_ITEMS = 50  # per list/tuple/set/dict field value; then "+N more"
MAX_FIELDS = 100  # fields per record; then a "+more" field with the count left out

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators (some viewers break lines there too).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def truncate(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"


def escape(text: str) -> str:
    """Control characters as Python escapes (``\\n``, ``\\r``, ``\\x1b``, ``\\u2028``); the rest unchanged."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def bound(value: Any, depth: int = 0) -> Any:
    """``value`` with strings cut to :data:`MAX_VALUE_CHARS` and collections to :data:`MAX_ITEMS` (``+N more``);
    numbers, booleans and None as they are; anything else by its ``str``."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return truncate(value)
    if depth < 3 and isinstance(value, Mapping):
        items = list(value.items())
        out: dict[str, Any] = {truncate(str(k), MAX_KEY_CHARS): bound(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["+more"] = len(items) - MAX_ITEMS
        return out
    if depth < 3 and type(value) in (list, tuple, set, frozenset):  # a namedtuple prints as itself
        seq = list(value)
        out_list = [bound(v, depth + 1) for v in seq[:MAX_ITEMS]]
        if len(seq) > MAX_ITEMS:
            out_list.append(f"+{len(seq) - MAX_ITEMS} more")
        return out_list
    return truncate(str(value))


def bounded_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None) or {}
    if not isinstance(fields, Mapping):
        return {"fields": bound(fields)}
    items = list(fields.items())
    out = {truncate(str(k), MAX_KEY_CHARS): bound(v, 1) for k, v in items[:MAX_FIELDS]}
    if len(items) > MAX_FIELDS:
        out["+more"] = len(items) - MAX_FIELDS
    return out


def _text_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_text_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` is merged in, so logs are machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": truncate(record.getMessage()),
        }
        entry.update(bounded_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human format with the same structured fields as ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        msg = escape(truncate(record.getMessage()))
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {escape(record.name)}: {msg}"
        if fields := bounded_fields(record):
            # Escaped after joining a list, so a value cannot smuggle in control characters through its items; a
            # space or "=" inside a value stays (the line is still one line).
            line += " " + " ".join(f"{escape(k)}={escape(truncate(_text_value(v)))}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + "\n".join("    " + escape(ln) for ln in self.formatException(record.exc_info).splitlines())
        return line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
