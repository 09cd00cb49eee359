"""What every benchmark script shares: the machine header of a report, and writing it."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch


def machine() -> dict:
    """Date and machine of a run, recorded with every report (BENCHMARKS.md quotes them)."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def write_report(path: str | None, report: dict) -> None:
    """Write ``report`` as JSON to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {path}")
