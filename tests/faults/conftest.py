"""Fixtures of the fault-injection suite (helpers in faultkit.py, the fault driver in fault_driver.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faultkit
import pytest
from faultkit import SLEEP_UPDATES, run_cli


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every faulty run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(out) == 0
    summary = json.loads((out / "summary.json").read_text())
    slept = summary["counters"]["base_updates_in_sleep"]
    assert slept == SLEEP_UPDATES, (f"the tiny run now makes {slept} consolidation updates, not {SLEEP_UPDATES}: "
                                    f"update SLEEP_UPDATES (and SAVES) in faultkit.py, the fault points are drawn in them")
    assert not any("time" in key for key in summary["counters"])  # nothing wall-clock to ignore
    return out


@pytest.fixture(scope="session")
def parallel() -> Callable[[dict[str, Callable[[], object]]], dict[str, object]]:
    """Run named jobs two at a time (the runner has 2 cores); returns {name: result}."""

    def run(jobs: dict[str, Callable[[], object]]) -> dict[str, object]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(job) for name, job in jobs.items()}
            return {name: future.result() for name, future in futures.items()}

    return run


@pytest.fixture(scope="session")
def warm_driver(tmp_path_factory) -> None:
    """Compile the imports of a training process once into a bytecode cache the killed processes share."""
    faultkit.PYCACHE["dir"] = str(tmp_path_factory.mktemp("pycache"))
    code = "import biollm_cls.train, torch; torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])"
    subprocess.run([sys.executable, "-c", code], check=True, env=faultkit.driver_env(), timeout=240)
