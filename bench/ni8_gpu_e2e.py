"""Helpers of bench/ni8_gpu_e2e.sh (the NI8 pipeline end to end on one GPU); run by that script.

``model``: a random-init Qwen2.5-0.5B-shaped model directory (``--tiny``: 2 layers, hidden 64, for a CPU
check of the flow) with a byte-level BPE tokenizer trained offline on the Natural-Instructions task files
saved beside it, so that ``model.hf_model_name=<dir>`` with ``model.hf_local_files_only=true`` loads both.

``report``: per run the wall time, its split by phase and the device (``run_metadata.json``), the job's
wall time (Snakemake's benchmark file), the script's stages and the merged metrics table, as
``report.md`` / ``report.json``; the runs' small files are copied next to them (8 files at most).

Errors are one line ``error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=16384, max_position_embeddings=1024, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=True)
EOS = "<|endoftext|>"  # Qwen2.5's pad/eos token; here eos and pad


class E2EError(RuntimeError):
    """A problem reported as one line."""


# ---- model -------------------------------------------------------------------------------------------------
def task_texts(tasks_dir: Path) -> list[str]:
    """Definitions, inputs and outputs of every task file (the tokenizer's training text)."""
    files = sorted(tasks_dir.glob("task*.json"))
    if not files:
        raise E2EError(f"no task*.json files in {tasks_dir}; carry .device/e2e with ni-sample/ (bench/README.md)")
    texts = []
    for file in files:
        task = json.loads(file.read_text(encoding="utf-8"))
        texts += list(task.get("Definition") or [])
        for inst in task.get("Instances") or []:
            texts.append(inst["input"])
            texts += list(inst.get("output") or [])
    return texts + ["### Instruction:\n", "\n\n### Response:\n"]


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE (every string encodes, no unknown token) of at most `vocab` ids, eos = pad = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_model(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    tokenizer = train_tokenizer(task_texts(Path(args.tasks)), args.vocab)
    if len(tokenizer) > args.vocab:
        raise E2EError(f"the tokenizer has {len(tokenizer)} ids, more than the active vocabulary {args.vocab}")
    t_tok = time.perf_counter() - t0
    shape = dict(TINY if args.tiny else QWEN_05B)
    eos = tokenizer.eos_token_id
    config = Qwen2Config(**shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16, as Qwen2.5 ships
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    facts = {"model_dir": str(out), "shape": "tiny" if args.tiny else "qwen2.5-0.5b", "params": params,
             "tokenizer_ids": len(tokenizer), "active_vocab": args.vocab, "init_device": device,
             "tokenizer_s": round(t_tok, 1), "total_s": round(time.perf_counter() - t0, 1)}
    (out / "e2e_facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(f"model: {json.dumps(facts)}", flush=True)


# ---- report ------------------------------------------------------------------------------------------------
def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _benchmark_s(path: Path) -> float | None:
    """The job's wall seconds from Snakemake's benchmark TSV (column `s`)."""
    try:
        with path.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        return round(float(row["s"]), 1)
    except (OSError, StopIteration, KeyError, ValueError):
        return None


def run_facts(results: Path, ablation: str, seed: str) -> dict:
    run_dir = results / "runs" / ablation / f"seed{seed}"
    meta, summary = _json(run_dir / "run_metadata.json"), _json(run_dir / "summary.json")
    facts = meta.get("device_facts") or {}
    timing = meta.get("timing") or {}
    kept = sorted((run_dir / "checkpoints").glob("step_*.pt")) if (run_dir / "checkpoints").is_dir() else []
    return {
        "run": f"{ablation}-seed{seed}", "complete": bool(summary), "status": meta.get("status"),
        "device": meta.get("device"), "gpu": facts.get("cuda_device_name"),
        "cuda_available": facts.get("cuda_available"), "torch": (meta.get("versions") or {}).get("torch"),
        "job_wall_s": _benchmark_s(results / "benchmarks" / "train" / ablation / f"seed{seed}.tsv"),
        "loop_wall_s": timing.get("wall_time_s"), "steps_per_s": timing.get("steps_per_s"),
        "phase_s": timing.get("phase_s") or {},
        "cuda_graphs": timing.get("cuda_graphs"),  # train.cuda_graphs: captures, replays, eager steps
        "last_checkpoint_gb": round(kept[-1].stat().st_size / 1e9, 2) if kept else None,
        "steps": (summary.get("run") or {}).get("steps"),
        "sleep_count": (summary.get("counters") or {}).get("sleep_count"),
        "base_gradient_rows": (summary.get("budget") or {}).get("base_gradient_rows"),
        "final_seen_acc_avg": summary.get("final_seen_acc_avg"),
    }


SUMMARY_COLUMNS = ["run_name", "view", "final_seen_acc_avg", "final_forgetting", "final_bwt", "seen_acc_auc",
                   "plasticity", "sleep_count", "base_gradient_rows", "fast_gradient_rows", "fisher_backwards",
                   "wall_time_s", "steps_per_s"]


def _fmt(value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def write_report(args: argparse.Namespace) -> None:
    import yaml

    config = yaml.safe_load(Path(args.config).read_text())
    results, out = Path(f"results/{config['suite_name']}"), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_facts(results, a, str(s)) for a in config["ablations"] for s in config["seeds"]]
    stages = []
    if args.stages and Path(args.stages).is_file():
        stages = [line.split("\t") for line in Path(args.stages).read_text().splitlines() if "\t" in line]
    phases = sorted({p for r in runs for p in r["phase_s"]},
                    key=lambda p: ["wake", "sleep", "fisher", "refresh", "evaluation", "checkpoint"].index(p)
                    if p in ("wake", "sleep", "fisher", "refresh", "evaluation", "checkpoint") else 99)
    table_path = results / "tables" / "suite_summary.csv"
    merged = []
    if table_path.is_file():
        with table_path.open() as f:
            merged = [[row.get(c, "") for c in SUMMARY_COLUMNS] for row in csv.DictReader(f)]
    model = _json(Path(args.model_dir) / "e2e_facts.json") if args.model_dir else {}

    lines = [f"# NI8 pipeline end to end: suite {config['suite_name']} ({args.config})", ""]
    lines += [f"snakemake exit code {args.snakemake_rc}; runs complete: "
              f"{sum(r['complete'] for r in runs)}/{len(runs)}", ""]
    if model:
        lines += [f"model: {model.get('shape')} ({model.get('params', 0) / 1e6:.1f} M parameters, random init), "
                  f"tokenizer {model.get('tokenizer_ids')} ids, active vocabulary {model.get('active_vocab')}", ""]
    lines += ["device=auto chose (run_metadata.json): " + "; ".join(
        f"{r['run']} {r['device']}" + (f" ({r['gpu']})" if r["gpu"] else "") for r in runs if r["device"]), ""]
    lines += ["## Runs (seconds)", ""]
    lines += _table(["run", "device", "gpu", "job wall", "loop wall", "steps/s", *phases, "sleeps", "ckpt GB"],
                    [[r["run"], r["device"], r["gpu"], r["job_wall_s"], r["loop_wall_s"], r["steps_per_s"],
                      *[r["phase_s"].get(p) for p in phases], r["sleep_count"], r["last_checkpoint_gb"]]
                     for r in runs])
    lines += ["", "job wall = the whole `train` job (process start, model load, data); loop wall = the training "
              "loop (run_metadata.json timing.wall_time_s), split by phase (timing.phase_s); ckpt GB = the "
              f"run's last checkpoint. Run directories on {args.results_on}.", ""]
    lines += [f"captured steps (train.cuda_graphs) of {r['run']}: {r['cuda_graphs']}" for r in runs
              if r.get("cuda_graphs")] + [""]
    if stages:
        lines += ["## Stages of the script (seconds)", ""] + _table(["stage", "s"], stages) + [""]
    lines += ["## Merged metrics (tables/suite_summary.csv)", ""]
    lines += _table(SUMMARY_COLUMNS, merged) if merged else ["(no suite table: a run did not complete)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"config": args.config, "snakemake_rc": args.snakemake_rc,
                                                 "results_on": args.results_on,
                                                 "model": model, "runs": runs, "stages": dict(stages),
                                                 "suite_summary": [dict(zip(SUMMARY_COLUMNS, row, strict=True))
                                                                   for row in merged]}, indent=1) + "\n")
    # the runs' small files, flat (report.md, report.json, log.txt + these stay within $OUT's 8 files)
    for r in runs:
        run_dir = results / "runs" / r["run"].replace("-seed", "/seed")
        for name in ("summary.json", "run_metadata.json"):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, out / f"{r['run']}.{name}")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:  # everything small: no checkpoints, no pack
        for path in sorted(results.rglob("*")):
            if path.is_file() and "checkpoints" not in path.parts and "data" not in path.parts[2:3]:
                tar.add(path, arcname=str(path.relative_to(results.parent)))
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="random-init model directory with a tokenizer")
    m.add_argument("--tasks", required=True, help="folder of Natural-Instructions task*.json files")
    m.add_argument("--out", required=True)
    m.add_argument("--vocab", type=int, default=16384, help="tokenizer ids at most (the run's model.vocab_size)")
    m.add_argument("--tiny", action="store_true", help="2 layers, hidden 64 (a CPU check of the flow)")
    r = sub.add_parser("report", help="report.md / report.json of a finished suite")
    r.add_argument("--config", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--stages", help="TSV of `stage<TAB>seconds` lines")
    r.add_argument("--model-dir")
    r.add_argument("--snakemake-rc", type=int, default=0)
    r.add_argument("--results-on", default="disk", help="where the run directories were (for the report)")
    args = parser.parse_args(argv)
    try:
        build_model(args) if args.command == "model" else write_report(args)
    except E2EError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
