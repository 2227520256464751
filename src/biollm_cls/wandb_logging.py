"""The W&B mirror of a run's local files.

The run directory (``metrics.jsonl``, ``summary.json``, ...) is the source of truth; this module copies
it to Weights & Biases while the run goes (see ``docs/wandb.md``):

* every ``metrics.jsonl`` row -> ``run.log`` with ``step`` as the x-axis. Curated charts: a step row
  sends ``core/<k>`` for each numeric key documented in the metric glossary (scopes step and sleep); a
  boundary row sends ``boundary/<key>`` for every documented numeric key, per-task keys included
  (``boundary/system/task_acc/<task>``). ``logging.wandb_log_full_history`` also sends the raw keys.
  Text values go to the run summary, never to a chart; ``null`` values are left out (never 0).
* the final summary -> ``run.summary`` (flattened with ``/``); config, metadata, the metrics history and
  the glossary -> artifacts; checkpoints -> model artifacts when ``logging.upload_checkpoints``.

Mode: ``logging.wandb_mode`` (offline by default), overridden by ``WANDB_MODE`` when set; ``online``
without an API key falls back to ``offline`` with one warning; ``disabled`` (or ``use_wandb=false``)
writes nothing. W&B files live in ``<run_dir>/wandb``. A W&B error never stops training: the mirror
warns once and switches itself off. The API key is never written: config and runtime values are
scrubbed of it, and only its variable's *name* is part of the config.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from biollm_cls import metric_glossary as glossary
from biollm_cls.config import flatten as flatten_config
from biollm_cls.config.schema import RunConfig

_LOG = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
_ENV_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
REDACTED = "<redacted>"
# Key names of credentials: whole words (`api_key`, `auth_token`, `secret`), not `tokenizer_name`.
_SECRET_KEY = re.compile(r"(?:^|[_.-])(api[_-]?key|apikey|token|secret|password|passwd)(?:$|[_.-])", re.IGNORECASE)
_MIN_SECRET_LEN = 8
_STEP_KEYS = glossary.names("step")
_SLEEP_KEYS = glossary.names("sleep")
# Files `finish` uploads, by key of its `files` argument: artifact name suffix, artifact type.
ARTIFACT_GROUPS: dict[str, tuple[str, str, str]] = {
    # files key: (artifact suffix, artifact type, config switch)
    "config": ("validated-config", "config", "upload_config_artifact"),
    "metadata": ("run-metadata", "metadata", "upload_metadata_artifact"),
    "metrics": ("metrics-history", "metrics", "upload_metrics_artifact"),
    "summary": ("metrics-history", "metrics", "upload_metrics_artifact"),
    "task_matrix": ("metrics-history", "metrics", "upload_metrics_artifact"),
}


# ---------------------------------------------------------------------------------------------------
# Mode, naming and secrets (pure functions, also used by the suite dashboard)


def _warn(message: str) -> None:
    _LOG.warning("W&B: %s", message)


def resolve_mode(configured: str, api_key_env_var: str, environ: Mapping[str, str] | None = None) -> str:
    """The effective W&B mode: ``WANDB_MODE`` if set (else the configured one); online needs a key."""
    environ = os.environ if environ is None else environ
    mode = configured
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        env_mode = _ENV_MODE_ALIASES.get(env_mode, env_mode)
        if env_mode in MODES:
            mode = env_mode
        else:
            _warn(f"ignoring WANDB_MODE={env_mode!r} (not one of {', '.join(MODES)}); using {configured!r}")
    if mode == "online" and not environ.get(api_key_env_var, "").strip():
        _warn(f"mode online but ${api_key_env_var} is empty: logging offline instead "
              f"(sync later with `wandb sync <run_dir>/wandb/offline-run-*`)")
        mode = "offline"
    return mode


def slug(text: Any) -> str:
    """Lowercase, runs of non-alphanumerics become ``-``; empty becomes ``na``."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "na"


def model_label(cfg: RunConfig) -> str:
    """The model part of an auto group: the provider, or the last path part of the HF model name."""
    if cfg.model.provider == "hf" and cfg.model.hf_model_name:
        return cfg.model.hf_model_name.rstrip("/").split("/")[-1]
    return cfg.model.provider


def auto_group(cfg: RunConfig, today: dt.date | None = None) -> str:
    """``auto-<slug(benchmark)>-<slug(model)>-<YYYYMMDD>`` (the reference's automatic group)."""
    today = today or dt.date.today()
    return f"auto-{slug(cfg.benchmark.name)}-{slug(model_label(cfg))}-{today:%Y%m%d}"


def run_name(cfg: RunConfig) -> str | None:
    """Explicit ``wandb_run_name``, else ``<ablation>-seed<seed>`` in a suite, else None (W&B picks one)."""
    if cfg.logging.wandb_run_name:
        return cfg.logging.wandb_run_name
    if cfg.suite_name:
        return f"{cfg.ablation_name}-seed{cfg.seed}"
    return None


def run_group(cfg: RunConfig, today: dt.date | None = None) -> str | None:
    """Explicit ``wandb_group``, else the suite name, else the auto group (when ``wandb_auto_group``)."""
    if cfg.logging.wandb_group:
        return cfg.logging.wandb_group
    if cfg.suite_name:
        return cfg.suite_name
    return auto_group(cfg, today) if cfg.logging.wandb_auto_group else None


def derive_run_id(cfg: RunConfig, run_dir: Path) -> str:
    """A stable W&B run id: ``wandb_run_id`` if set, else ``<ablation>-s<seed>-<hash>``.

    The hash covers the project, suite, ablation, seed and the resolved run directory, so a retried or
    resumed run (same directory) continues the same W&B run, and two suites never share an id.
    """
    if cfg.logging.wandb_run_id:
        return cfg.logging.wandb_run_id
    key = "|".join([cfg.logging.wandb_project, str(cfg.suite_name), cfg.ablation_name, str(cfg.seed),
                    str(Path(run_dir).resolve())])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return f"{slug(cfg.ablation_name)[:40]}-s{cfg.seed}-{digest}"


def secret_values(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the API-key variables (configured one and ``WANDB_API_KEY``) that must never be written."""
    environ = os.environ if environ is None else environ
    names = {cfg.logging.wandb_api_key_env_var, "WANDB_API_KEY"}
    values = {environ.get(name, "").strip() for name in names}
    return sorted(v for v in values if len(v) >= _MIN_SECRET_LEN)


def scrub(value: Any, secrets: list[str]) -> Any:
    """A copy of ``value`` with secret-named keys and any string containing a secret replaced by a marker."""
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets):
        return REDACTED
    return value


def _is_secret_key(key: Any) -> bool:
    """Keys named like credentials; ``*_env_var`` keys hold a variable *name* and are kept."""
    key = str(key)
    return bool(_SECRET_KEY.search(key)) and not key.endswith("_env_var")


# ---------------------------------------------------------------------------------------------------
# Row routing (pure functions): which keys of a metrics.jsonl row go to charts and which to the summary


def _is_number(value: Any) -> bool:
    """Chartable: int, float or bool (numpy scalars included); strings, lists and None are not."""
    return isinstance(value, numbers.Real)


def _chart_value(value: Any) -> float | int:
    return int(value) if isinstance(value, bool) else value


def slept(row: Mapping[str, Any]) -> bool:
    """True when a sleep cycle ran at this step (applied or skipped updates)."""
    return bool(row.get("sleep_steps") or row.get("skipped_steps"))


def step_payload(row: Mapping[str, Any], full_history: bool) -> dict[str, Any]:
    """Chart values of a step row: ``core/<k>`` for documented numeric keys (+ raw keys when full).

    Sleep metrics (glossary scope ``sleep``) are charted only on steps that slept, so a chart of
    ``core/distill_kl`` shows one point per sleep cycle instead of zeros in between.
    """
    charted = _STEP_KEYS | _SLEEP_KEYS if slept(row) else _STEP_KEYS
    payload: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("kind", "step") or not _is_number(value):
            continue
        if key in charted:
            payload[f"core/{key}"] = _chart_value(value)
        if full_history:
            payload[key] = _chart_value(value)
    return payload


def boundary_payload(row: Mapping[str, Any], full_history: bool) -> dict[str, Any]:
    """Chart values of a boundary row: ``boundary/<key>`` for documented numeric keys (+ raw when full)."""
    payload: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("kind", "step") or not _is_number(value):
            continue
        if glossary.lookup(key, ("boundary",)) is not None:
            payload[f"boundary/{key}"] = _chart_value(value)
        if full_history:
            payload[key] = _chart_value(value)
    return payload


def text_values(row: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Non-numeric, non-null values of a row (strings, lists), for the run summary under ``prefix``."""
    return {f"{prefix}{key}": value for key, value in row.items()
            if key != "kind" and value is not None and not _is_number(value)}


def undocumented_numeric_keys(row: Mapping[str, Any]) -> list[str]:
    """Numeric keys of a step/boundary row that the glossary does not describe (not charted when curated)."""
    scopes = ("boundary",) if row.get("kind") == "boundary" else ("step", "sleep")
    return sorted(k for k, v in row.items()
                  if k not in ("kind", "step") and _is_number(v) and glossary.lookup(k, scopes) is None)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"views": {"system": {"x": 1}}}`` -> ``{"views/system/x": 1}`` (W&B's separator)."""
    return flatten_config(tree, prefix, sep="/")


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------------------------------------------
# The mirror


def _guarded(method: Callable) -> Callable:
    """Run a mirror method only while the mirror is live; on any error warn once and switch W&B off."""

    @functools.wraps(method)
    def wrapper(self: WandbMirror, *args: Any, **kwargs: Any) -> Any:
        if self.run is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # W&B must never stop training
            self._disable(method.__name__, exc)
            return None

    return wrapper


class WandbMirror:
    """A live W&B run that mirrors one run directory. Build it with ``open_wandb_mirror``."""

    def __init__(self, wandb: Any, run: Any, cfg: RunConfig, run_dir: Path, secrets: list[str]):
        self.wandb, self.run, self.cfg = wandb, run, cfg
        self.run_dir = Path(run_dir)
        self.run_id: str = run.id
        self.artifact_prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", self.run_id)
        self._secrets = secrets
        self._checkpoint_steps: set[int] = set()
        self._undocumented: set[str] = set()
        self._texts: dict[str, Any] = {}
        self._watched = False

    @_guarded
    def setup(self) -> None:
        """``step`` is the x-axis of every chart; the glossary table is logged once, at the start."""
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.log({"glossary/metrics": glossary.wandb_table(self.wandb)})

    @property
    def active(self) -> bool:
        """True while the W&B run is open and healthy."""
        return self.run is not None

    @_guarded
    def log(self, row: Mapping[str, Any]) -> None:
        """Mirror one ``metrics.jsonl`` row (``kind`` step, boundary or summary)."""
        kind = row.get("kind")
        full = self.cfg.logging.wandb_log_full_history
        if kind == "summary":
            self._update_summary(flatten({k: v for k, v in row.items() if k not in ("kind", "step")}))
            return
        if kind == "step":
            payload, texts = step_payload(row, full), text_values(row, "core/")
            if not slept(row):
                texts = {k: v for k, v in texts.items() if k.removeprefix("core/") not in _SLEEP_KEYS}
        elif kind == "boundary":
            payload, texts = boundary_payload(row, full), text_values(row, "boundary/")
        else:  # not part of the contract: keep its values, out of the charts
            self._update_summary({f"{kind}/{k}": v for k, v in row.items() if k != "kind"})
            return
        self._note_undocumented(row)
        self._update_texts(texts)
        if payload and "step" in row:
            self.run.log({"step": row["step"], **payload})

    @_guarded
    def log_checkpoint(self, path: Path, step: int) -> None:
        """Upload a checkpoint as a model artifact (aliases ``latest``, ``step-<n>``) when enabled; once per step."""
        if not self.cfg.logging.upload_checkpoints or step in self._checkpoint_steps:
            return
        path = Path(path)
        artifact = self.wandb.Artifact(f"{self.artifact_prefix}-checkpoint", type="model",
                                       metadata={"step": int(step)})
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["latest", f"step-{int(step)}"])
        self._checkpoint_steps.add(step)

    @_guarded
    def watch(self, model: Any) -> None:
        """``wandb.watch`` the base model's gradients when ``logging.wandb_watch_model``."""
        if self.cfg.logging.wandb_watch_model:
            self.run.watch(model, log="gradients", log_freq=self.cfg.logging.wandb_watch_log_freq)
            self._watched = True

    def finish(self, summary: Mapping[str, Any], files: Mapping[str, Path], exit_code: int = 0) -> None:
        """Write the final summary, upload the run files as artifacts and close the W&B run.

        ``files`` keys: ``config`` (validated_config.json), ``metadata`` (run_metadata.json), ``metrics``
        (metrics.jsonl), ``summary``, ``task_matrix``, ``glossary_json``/``glossary_md`` (written here into
        ``<run_dir>/wandb/glossary`` when absent). Missing files are skipped. ``exit_code`` != 0 marks
        the W&B run as failed.
        """
        self._finish_content(summary, files)
        if self.run is not None:
            try:
                self._close(exit_code)
            except Exception as exc:  # the run files are already complete
                _warn(f"finish failed ({type(exc).__name__}: {exc}); local files are complete")

    @_guarded
    def _finish_content(self, summary: Mapping[str, Any], files: Mapping[str, Path]) -> None:
        self._update_summary(flatten(summary))
        self._log_file_artifacts(files)
        self.run.log_artifact(self._glossary_artifact(files))

    def _log_file_artifacts(self, files: Mapping[str, Path]) -> None:
        """One artifact per group of ``ARTIFACT_GROUPS`` whose switch is on and whose files exist."""
        groups: dict[str, Any] = {}
        for key, path in files.items():
            if key not in ARTIFACT_GROUPS or not Path(path).is_file():
                continue
            suffix, kind, switch = ARTIFACT_GROUPS[key]
            if not getattr(self.cfg.logging, switch):
                continue
            if suffix not in groups:
                groups[suffix] = self.wandb.Artifact(f"{self.artifact_prefix}-{suffix}", type=kind)
            groups[suffix].add_file(str(path), name=Path(path).name)
        for artifact in groups.values():
            self.run.log_artifact(artifact)

    def _glossary_artifact(self, files: Mapping[str, Path]) -> Any:
        json_path, md_path = files.get("glossary_json"), files.get("glossary_md")
        if not (json_path and md_path and Path(json_path).is_file() and Path(md_path).is_file()):
            json_path, md_path = glossary.write_glossary(self.run_dir / "wandb" / "glossary")
        return glossary.wandb_artifact(self.wandb, Path(json_path), Path(md_path))

    def _update_texts(self, texts: Mapping[str, Any]) -> None:
        """Send text values to the summary only when they change (a step row repeats them every step)."""
        changed = {k: v for k, v in texts.items() if self._texts.get(k) != v}
        if changed:
            self._update_summary(changed)
            self._texts.update(changed)

    def _update_summary(self, values: Mapping[str, Any]) -> None:
        clean = scrub({k: _finite_or_none(v) for k, v in values.items()}, self._secrets)
        self.run.summary.update(clean)

    def _note_undocumented(self, row: Mapping[str, Any]) -> None:
        """Warn once per key that a numeric metric is missing from the glossary (so it is not charted)."""
        new = [k for k in undocumented_numeric_keys(row) if k not in self._undocumented]
        if new and not self.cfg.logging.wandb_log_full_history:
            _warn(f"not charted (add to metric_glossary.py): {', '.join(new)}")
        self._undocumented.update(new)

    def _disable(self, where: str, exc: Exception) -> None:
        """Warn once and close the run; training goes on with the local files only."""
        _warn(f"{where} failed ({type(exc).__name__}: {exc}); continuing without W&B "
              f"(local files in {self.run_dir} are complete)")
        try:
            self._close(exit_code=1)
        except Exception:  # already failing; the warning above is the report
            pass

    def _close(self, exit_code: int) -> None:
        """Remove the gradient hooks first (they would log into a closed run), then finish the run."""
        run, self.run = self.run, None
        if self._watched:
            self._watched = False
            run.unwatch()
        run.finish(exit_code=exit_code)


# ---------------------------------------------------------------------------------------------------
# Opening


def init_kwargs(cfg: RunConfig, run_dir: Path, runtime: Mapping[str, Any], mode: str,
                secrets: list[str]) -> dict[str, Any]:
    """Keyword arguments of ``wandb.init`` for this run (no secrets; pure, so tests can inspect them)."""
    log = cfg.logging
    config = scrub({**dataclasses.asdict(cfg), "runtime": dict(runtime)}, secrets)
    tags = list(dict.fromkeys([*log.wandb_tags, cfg.ablation_name]))
    return {
        "project": log.wandb_project,
        "entity": log.wandb_entity,
        "mode": mode,
        "dir": str(run_dir),
        "id": derive_run_id(cfg, run_dir),
        "resume": log.wandb_resume or "allow",
        "name": scrub(run_name(cfg), secrets),
        "group": scrub(run_group(cfg), secrets),
        "job_type": log.wandb_job_type,
        "tags": scrub([t[:64] for t in tags], secrets),
        "notes": scrub(log.wandb_notes, secrets),
        "config": config,
        # one run per process; the global `wandb.run` must be this run (wandb.watch's hooks log through it)
        "reinit": "finish_previous",
    }


def open_wandb_mirror(cfg: RunConfig, run_dir: Path, runtime: dict) -> WandbMirror | None:
    """Start the W&B run mirroring ``run_dir``; None when W&B is off (nothing is written then) or fails."""
    if not cfg.logging.use_wandb:
        return None
    mode = resolve_mode(cfg.logging.wandb_mode, cfg.logging.wandb_api_key_env_var)
    if mode == "disabled":
        return None
    try:
        import wandb

        secrets = secret_values(cfg)
        kwargs = init_kwargs(cfg, Path(run_dir), runtime, mode, secrets)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        key = os.environ.get(cfg.logging.wandb_api_key_env_var, "").strip()
        settings = wandb.Settings(api_key=key) if mode == "online" and key else None
        run = wandb.init(**kwargs, settings=settings)
    except Exception as exc:  # W&B must never stop training
        _warn(f"init failed ({type(exc).__name__}: {exc}); continuing without W&B")
        return None
    mirror = WandbMirror(wandb, run, cfg, Path(run_dir), secrets)
    mirror.setup()
    return mirror if mirror.active else None
