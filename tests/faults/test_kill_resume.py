"""kill -9 a training process at random points, rerun the same command: the outputs match an uninterrupted run.

Each scenario SIGKILLs a real ``python -m biollm_cls.cli train`` process (``fault_driver.py``) at a point
drawn with ``random.Random(BIOLLM_FAULT_SEED)`` (default 11; the drawn points are in the test ids): in a
wake step, inside a sleep cycle, in the middle of a checkpoint write, right after a checkpoint's rename,
while the run writes its final files, twice in a row, and
once from outside at a random moment (``kill -9`` by the parent, timed by metrics.jsonl's length). The
rerun (in-process, the same CLI) must say on stderr only from which checkpoint it resumes (no warning: no
kill may leave a torn checkpoint under a checkpoint's name) and reproduce summary.json and task_matrix.csv byte for byte, and every metrics row.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faultkit import (
    SAVES,
    SLEEP_UPDATES,
    STEPS,
    assert_quiet_rerun,
    assert_same_as_reference,
    driver_command,
    driver_env,
    run_cli,
    run_driver,
)

SEED = int(os.environ.get("BIOLLM_FAULT_SEED", "11"))
_rng = random.Random(SEED)

SCENARIOS: dict[str, list[dict]] = {}  # name -> the faults of the killed runs, in order
# draws are stratified (early / late in the run) so that each kind of fault hits both halves
_early = _rng.randint(1, 3)
SCENARIOS[f"wake-step{_early}-before-any-checkpoint"] = [{"point": "wake", "step": _early}]
for low, high in ((4, STEPS // 2), (STEPS // 2 + 1, STEPS)):
    step = _rng.randint(low, high)
    SCENARIOS[f"wake-step{step}"] = [{"point": "wake", "step": step}]
for low, high in ((1, SLEEP_UPDATES // 2), (SLEEP_UPDATES // 2 + 1, SLEEP_UPDATES)):
    call = _rng.randint(low, high)
    SCENARIOS[f"sleep-update{call}"] = [{"point": "sleep_step", "call": call}]
for low, high in ((1, SAVES // 2), (SAVES // 2 + 1, SAVES)):
    call, fraction = _rng.randint(low, high), round(_rng.uniform(0.05, 0.95), 2)
    SCENARIOS[f"checkpoint-write{call}-at{fraction}"] = [{"point": "checkpoint_write", "call": call,
                                                          "fraction": fraction}]
_call = _rng.randint(1, SAVES)
SCENARIOS[f"checkpoint-renamed{_call}"] = [{"point": "checkpoint_renamed", "call": _call}]
SCENARIOS["finish"] = [{"point": "finish"}]
_first, _second = _rng.randint(1, 7), _rng.randint(1, 3)  # a save up to step 24: the step-30 sleep is still ahead
SCENARIOS[f"twice-checkpoint-write{_first}-then-sleep-update{_second}"] = [
    {"point": "checkpoint_write", "call": _first, "fraction": 0.5}, {"point": "sleep_step", "call": _second}]
EXTERNAL_ROWS = _rng.randint(3, 28)  # metrics.jsonl rows written before the parent's kill -9
SCENARIOS[f"external-kill9-after-{EXTERNAL_ROWS}-rows"] = []


def external_kill(out: Path, rows: int) -> tuple[int, str]:
    """Start an unfaulted run and SIGKILL it from outside once metrics.jsonl has `rows` lines."""
    proc = subprocess.Popen(driver_command({"point": "none"}, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=driver_env())
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if metrics.read_bytes().count(b"\n") >= rows:
                os.kill(proc.pid, signal.SIGKILL)
                break
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.fixture(scope="module")
def killed(tmp_path_factory, parallel, warm_driver) -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    """Every scenario's run directory after its kills, with (exit code, stderr) of each killed process."""
    root = tmp_path_factory.mktemp("killed")

    def job(name: str, faults: list[dict]):
        out = root / name / "run"
        if not faults:
            return out, [external_kill(out, EXTERNAL_ROWS)]
        results = []
        for fault in faults:
            proc = run_driver(fault, out)
            results.append((proc.returncode, proc.stderr))
        return out, results

    return parallel({name: (lambda n=name, f=faults: job(n, f)) for name, faults in SCENARIOS.items()})


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_run_resumes_to_identical_outputs(name, killed, reference, capfd):
    out, results = killed[name]
    for code, err in results:
        assert code == -signal.SIGKILL, f"{name}: the process was not killed (exit {code}): {err[-2000:]}"
    assert not (out / "summary.json").exists()
    capfd.readouterr()
    assert run_cli(out) == 0
    assert_quiet_rerun(capfd.readouterr().err)  # no warning: no kill may leave a torn checkpoint
    assert_same_as_reference(out, reference)
