"""Run ``python -m biollm_cls.cli train ...`` in this process with ONE fault armed, then let it happen.

    python tests/faults/fault_driver.py '<fault json>' [train overrides ...]

The fault is installed by wrapping a library function (nothing in the library is changed; with no fault,
``{"point": "none"}``, this is exactly the CLI). ``kill`` faults end the process with SIGKILL, as
``kill -9`` would, at the chosen point:

* ``wake`` ``{"step": k}``: in step k, after the wake update, before the batch enters replay;
* ``sleep_step`` ``{"call": n}``: right after the n-th consolidation update (inside a sleep cycle);
* ``checkpoint_write`` ``{"call": n, "fraction": f}``: the n-th checkpoint's temp file holds the first
  fraction f of its bytes (a write cut short);
* ``checkpoint_renamed`` ``{"call": n}``: the n-th checkpoint is renamed into place, the folder not yet synced;
* ``finish``: the task matrix and metadata are written, the glossary and summary.json not yet.

``enospc_checkpoint`` ``{"call": n}`` is not a kill: the n-th checkpoint write fails with
``OSError(ENOSPC)`` after writing part of the file, as on a full disk.

Non-finite faults are not kills either; ``value`` is ``"nan"``, ``"inf"`` or ``"-inf"``:

* ``nonfinite_wake`` ``{"step": k, "value": v}``: in wake step k one element of the hidden state that enters
  the hippocampus is v (so routing, usage statistics, the delta, the loss and the post-update teacher of that
  step are all non-finite);
* ``nonfinite_sleep`` ``{"call": n, "value": v}``: in the n-th consolidation update the base's first logit row
  is v (the sleep loss is non-finite).

``install(fault, patch)`` takes the function that replaces a module attribute: ``setattr`` in the driver's
own process, ``monkeypatch.setattr`` for a fault installed inside a test process.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counter():
    """A call counter: `hit(n)` is True on the n-th call."""
    calls = {"n": 0}

    def hit(n: int) -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return hit


def install(fault: dict, patch=setattr) -> None:
    point = fault["point"]
    hit = _counter()
    if point == "none":
        return
    if point == "wake":
        import biollm_cls.train as train

        real = train.remember

        def remember(*args, **kwargs):
            if kwargs.get("step", args[-1]) == fault["step"]:  # remember(run, batch, rows, wake, step)
                _kill()
            return real(*args, **kwargs)

        patch(train, "remember", remember)
    elif point == "sleep_step":
        import biollm_cls.sleep as sleep

        real = sleep.sleep_step

        def sleep_step(*args, **kwargs):
            out = real(*args, **kwargs)
            if hit(fault["call"]):
                _kill()
            return out

        patch(sleep, "sleep_step", sleep_step)
    elif point in ("checkpoint_write", "enospc_checkpoint"):
        import torch

        real = torch.save

        def save(obj, f, *args, **kwargs):
            if not hit(fault["call"]):
                return real(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: int(len(data) * fault.get("fraction", 0.5))])
            f.flush()
            if point == "enospc_checkpoint":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            _kill()

        patch(torch, "save", save)
    elif point == "checkpoint_renamed":
        import biollm_cls.checkpoint as checkpoint

        real = checkpoint.fsync_dir

        def fsync_dir(folder):
            if hit(fault["call"]):
                _kill()
            return real(folder)

        patch(checkpoint, "fsync_dir", fsync_dir)
    elif point == "finish":
        import biollm_cls.train as train

        def write_glossary(directory):
            _kill()

        patch(train, "write_glossary", write_glossary)
    elif point == "nonfinite_wake":
        import biollm_cls.train as train

        real, value = train.wake_step, float(fault["value"])

        def wake_step(learner, *args, **kwargs):
            if not hit(fault["step"]):  # wake_step runs once per step: the k-th call is step k
                return real(learner, *args, **kwargs)
            hippocampus = learner.hippocampus
            forward = hippocampus.forward

            def poisoned(h, *a, **k):
                h = h.clone()
                h[0, 0, 0] = value
                return forward(h, *a, **k)

            hippocampus.forward = poisoned
            try:
                return real(learner, *args, **kwargs)
            finally:
                del hippocampus.forward

        patch(train, "wake_step", wake_step)
    elif point == "nonfinite_sleep":
        import biollm_cls.sleep as sleep

        real, value = sleep.sleep_step, float(fault["value"])

        def sleep_step(learner, *args, **kwargs):
            if not hit(fault["call"]):
                return real(learner, *args, **kwargs)
            logits = learner.logits

            def poisoned(hidden):
                out = logits(hidden).clone()
                out[0] = value
                return out

            learner.logits = poisoned
            try:
                return real(learner, *args, **kwargs)
            finally:
                del learner.logits

        patch(sleep, "sleep_step", sleep_step)
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def main(argv: list[str]) -> int:
    install(json.loads(argv[0]))
    from biollm_cls.cli import main as cli_main

    return cli_main(["train", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
