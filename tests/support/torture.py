"""The torture report: the counted outcome of one fault scenario."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass
class TortureOutcome:
    """What one scenario did to the messages it sent: the counts of the torture report."""

    scenario: str
    rounds: int = 0
    acknowledged: int = 0  # answered 250 (or accepted by smarthost-sendmail)
    delivered: int = 0  # distinct messages the upstream got
    bounced: int = 0  # distinct messages whose sender got a DSN instead
    lost: int = 0  # acknowledged, neither delivered nor bounced: must be 0
    duplicated: int = 0  # extra copies the upstream got
    in_flight: int = 0  # messages an attempt was on when the fault hit (bounds duplicated)
    note: str = ""


def arrival_counts(acknowledged: Iterable[str], got: Mapping[str | None, int]) -> dict[str, int]:
    """The report's counts for messages told apart by Message-ID: `acknowledged` (the
    IDs answered 250) against `got` (copies the upstream received, by ID)."""
    acked = set(acknowledged)
    return {
        "acknowledged": len(acked),
        "delivered": len(acked & set(got)),
        "lost": len(acked - set(got)),
        "duplicated": sum(got[m] - 1 for m in acked if m in got),
    }
