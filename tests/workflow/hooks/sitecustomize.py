"""Test hook of tests/workflow (on PYTHONPATH only there): SIGKILL one `train` process in one wake step.

Active only in a process started as ``python -m biollm_cls.cli train ...`` while BIOLLM_TEST_KILL_TRAIN is
"<text in the logging.output_dir override>:<step>": when ``biollm_cls.train`` is imported, its ``remember``
(called once per wake step, after the update) is wrapped to end the process with SIGKILL, as ``kill -9``
would, in that step. Every other process (Snakemake itself, other rules, other runs) is left alone.
"""

import os
import sys

_SPEC = os.environ.get("BIOLLM_TEST_KILL_TRAIN", "")
_ARGS = getattr(sys, "argv", [])


def _armed() -> tuple[bool, int]:
    if not _SPEC or "train" not in _ARGS[1:2]:
        return False, 0
    where, _, step = _SPEC.rpartition(":")
    hit = any(a.startswith("logging.output_dir=") and where in a for a in _ARGS)
    return hit, int(step)


_HIT, _STEP = _armed()

if _HIT:
    import importlib.abc
    import importlib.util
    import signal

    class _KillIn(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "biollm_cls.train":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_wrap(module):
                exec_module(module)
                real = module.remember

                def remember(*args, **kwargs):  # remember(run, batch, stream_rows, wake, step)
                    if args[-1] == _STEP:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                module.remember = remember

            spec.loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, _KillIn())
