"""The benchmarks' step runner: each step's result cached as JSON, a cached step not run again unless forced."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def run_steps(steps: dict[str, Callable[[], dict]], chosen: list[str], cache: Path, *, force: bool = False,
              report_only: bool = False) -> None:
    """Run each chosen step not cached yet (all with `force`; none with `report_only`) and print every cached one."""
    cache.mkdir(parents=True, exist_ok=True)
    for step in chosen:
        path = cache / f"{step}.json"
        if not report_only and (force or not path.exists()):
            path.write_text(json.dumps(steps[step](), indent=1))
        if path.exists():
            print(f"## {step}\n{path.read_text()}")
