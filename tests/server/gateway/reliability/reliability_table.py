"""Renders the generated sections of RELIABILITY.md:

* ``bad-input``: the table of reliability_cases.CASES (what test_reliability_bad_input.py asserts);
* ``faults``: the outcomes the fault and overload tests measured in their last run
  (``.cache/reliability/faults.json``, written by those tests), when that file exists.

    .venv/bin/python tests/server/gateway/reliability/reliability_table.py [--doc RELIABILITY.md]

Each section sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; the rest of the file is left alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from reliability_cases import CASES, Case  # noqa: E402

ROOT = Path(__file__).resolve().parents[4]
FAULTS_JSON = ROOT / ".cache" / "reliability" / "faults.json"


def _cell(value: Any) -> str:
    return "—" if value is None else str(value).replace("|", "\\|")


def render_bad_input(cases: list[Case]) -> str:
    lines = [f"{len(cases)} cases, each sent to a live gateway (real tiny engine behind it); after each one the "
             "gateway must still answer a good chat request.", "",
             "| group | case | route | status | `code` | `param` |", "|---|---|---|---|---|---|"]
    for c in cases:
        route = f"{c.method} {c.path}"
        lines.append(f"| {c.group} | {_cell(c.name)} | `{route}` | {c.status} | {_cell(c.code)} | "
                     f"{_cell(c.param)} |")
    return "\n".join(lines)


def render_faults(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| scenario | outcome | measured |", "|---|---|---|"]
    for name in sorted(results):
        r = results[name]
        figures = ", ".join(f"{k} = {v}" for k, v in sorted(r.get("figures", {}).items()))
        lines.append(f"| {_cell(name)} | {_cell(r.get('outcome'))} | {_cell(figures or None)} |")
    return "\n".join(lines)


def update_doc(text: str, section: str, body: str) -> str:
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"RELIABILITY.md has no {start} … {end} section")
    return pattern.sub(lambda _m: f"{start}\n{body}\n{end}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", type=Path, default=ROOT / "RELIABILITY.md")
    args = parser.parse_args(argv)
    text = update_doc(args.doc.read_text(), "bad-input", render_bad_input(CASES))
    if FAULTS_JSON.exists():
        text = update_doc(text, "faults", render_faults(json.loads(FAULTS_JSON.read_text())))
    args.doc.write_text(text)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
