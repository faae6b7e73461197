"""Print the `make torture` report: one line per scenario from the JSON lines the torture
tests wrote (tests/conftest.py, fixture torture_report), grouped in sections. Exits 1 if
any message was lost.

A scenario's section is its name up to the last ": " (`clients: hostile: long line` is
in `clients: hostile`, `storage: disk full` in `storage`); sections keep the order in
which their first scenario ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("rounds", "acknowledged", "delivered", "bounced", "lost", "duplicated", "in_flight")


def section(scenario: str) -> str:
    return scenario.rsplit(": ", 1)[0] if ": " in scenario else ""


def sections(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        grouped.setdefault(section(r["scenario"]), []).append(r)
    return grouped


def main(path: str) -> int:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        print("torture: no scenario reported")
        return 1
    width = max(len(r["scenario"]) for r in rows)
    print(f"{'scenario':<{width}}  " + "  ".join(f"{c:>12}" for c in COLUMNS) + "  note")
    for name, rows_of_section in sections(rows).items():
        print(f"-- {name}" if name else "--")
        for r in rows_of_section:
            cells = "  ".join(f"{r.get(c, 0):>12}" for c in COLUMNS)
            print(f"{r['scenario']:<{width}}  {cells}  {r.get('note', '')}")
    totals = {c: sum(r.get(c, 0) for r in rows) for c in COLUMNS}
    print(f"{'TOTAL':<{width}}  " + "  ".join(f"{totals[c]:>12}" for c in COLUMNS))
    lost = totals["lost"]
    print(f"torture: {len(rows)} scenario lines, {lost} lost" + ("" if lost else " (OK)"))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "torture-report.jsonl"))
