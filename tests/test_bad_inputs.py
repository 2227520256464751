"""Bad inputs through the real CLI: each gives ONE stderr line naming the problem and the fix, exit code 2,
and writes nothing (no summary.json, no run directory, no pack, no checkpoint, no temp files).

Every case runs ``biollm_cls.cli.main(argv)`` in-process, the function ``python -m biollm_cls.cli`` runs,
with Python warnings printed to stderr as a process would print them; three cases also run as real
processes to check that the process exit status and stderr are the same. The table of cases and messages
is docs/run_outputs.md ("Bad inputs"); ``BIOLLM_BAD_INPUTS_TABLE=path uv run pytest tests/test_bad_inputs.py``
writes it again from the messages seen.

The Snakemake config schema is checked by the Snakefile before Snakemake's own ``validate``: exit code 2
and its report is a multi-line block on stdout; the last test records that as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from biollm_cls.cli import main

ROOT = Path(__file__).resolve().parents[1]

TOY = ["benchmark.num_tasks=2", "benchmark.switch_every=4", "benchmark.heldout_size=8", "model.seq_len=8",
       "model.hidden_size=16", "model.vocab_size=16", "model.num_layers=3", "model.num_heads=2",
       "model.injection_layer=1", "experts.num_experts=4", "experts.expert_hidden=8", "replay.capacity=32",
       "replay.batch_size=4", "ewc.fisher_samples=4", "train.batch_size=4", "train.eval_batch_size=8",
       "logging.checkpoint_interval=2", "train.num_threads=1", "train.progress=false", "device=cpu"]
INSTRUCTION = ["benchmark=instruction", "model.vocab_size=0", "model.seq_len=64", "model.hidden_size=16",
               "model.num_layers=3", "model.num_heads=2", "experts.num_experts=4", "experts.expert_hidden=8",
               "benchmark.num_tasks=3", "benchmark.switch_every=2", "benchmark.min_examples_per_task=1",
               "benchmark.heldout_per_task=4", "train.batch_size=4", "train.eval_batch_size=8",
               "train.num_threads=1", "train.progress=false", "device=cpu"]


# ---- inputs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    """A good 3-task synthetic pack (with pretrain.jsonl); cases copy it and break one thing."""
    from biollm_cls.benchmarks.packs.builder import BuildOptions, build_pack
    from biollm_cls.benchmarks.packs.synthetic import open_synthetic

    out = tmp_path_factory.mktemp("good") / "pack"
    options = BuildOptions(num_tasks=3, min_usable_per_task=16, train_per_task=10, eval_per_task=6,
                           include_definition=False)
    build_pack(open_synthetic(16, options.task_selection_seed, 20), out, options, progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A local WordLevel tokenizer ("high" = 10, "low" = 11) for the HF vocabulary-cap case."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]", "#", "Instruction", "Response", ":", "say", "yes", "no", "high", "low"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed tiny toy run (summary.json, checkpoints at steps 6 and 8)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TOY, f"logging.output_dir={out}"]) == 0
    return out


@dataclass
class Inputs:
    tmp: Path
    pack: Path
    tokenizer_dir: Path
    finished_run: Path

    def copy_pack(self, edit: Callable[[Path], None] | None = None) -> Path:
        out = self.tmp / "pack"
        shutil.copytree(self.pack, out)
        if edit is not None:
            edit(out)
        return out

    def train_on(self, pack: Path, *extra: str) -> list[str]:
        return ["train", *INSTRUCTION, f"benchmark.local_path={pack / 'train.jsonl'}",
                f"benchmark.eval_local_path={pack / 'eval.jsonl'}", f"logging.output_dir={self.tmp / 'run'}", *extra]

    def train_file(self, rows: bytes, *extra: str) -> list[str]:
        data = self.tmp / "data.jsonl"
        data.write_bytes(rows)
        return ["train", *INSTRUCTION, "benchmark.num_tasks=1", f"benchmark.local_path={data}",
                f"logging.output_dir={self.tmp / 'run'}", *extra]

    def toy(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["train", *TOY, f"logging.output_dir={out or self.tmp / 'run'}", *extra]

    def resumable_run(self) -> Path:
        """A copy of the finished run without summary.json (its config still names the original path)."""
        out = self.tmp / "resumable"
        shutil.copytree(self.finished_run, out)
        (out / "summary.json").unlink()
        config = json.loads((out / "validated_config.json").read_text())
        config["logging"]["output_dir"] = str(out)
        (out / "validated_config.json").write_text(json.dumps(config))
        return out


def rows(n: int = 6, task: str = "t0") -> bytes:
    return b"".join(json.dumps({"task": task, "instruction": f"say {i}", "output": "yes"}).encode() + b"\n"
                    for i in range(n))


def edit_metadata(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(pack: Path) -> None:
        meta = json.loads((pack / "metadata.json").read_text())
        change(meta)
        (pack / "metadata.json").write_text(json.dumps(meta, indent=2))

    return edit


def append_line(name: str, line: bytes) -> Callable[[Path], None]:
    def edit(pack: Path) -> None:
        with (pack / name).open("ab") as handle:
            handle.write(line)

    return edit


def _break_all_checkpoints(run: Path) -> Path:
    for path in (run / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    return run


def _checkpoints_without_config(i: Inputs) -> list[str]:
    out = i.tmp / "run"
    out.mkdir()
    shutil.copytree(i.finished_run / "checkpoints", out / "checkpoints")
    return i.toy()


def _restart_stale_on_a_folder_without_a_run(i: Inputs) -> list[str]:
    out = i.tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("someone's notes")
    return ["train", "--restart-stale", *TOY, f"logging.output_dir={out}"]


def _pack_without_pretrain(i: Inputs) -> list[str]:
    pack = i.copy_pack()
    (pack / "pretrain.jsonl").unlink()
    meta = json.loads((pack / "metadata.json").read_text())
    del meta["checksums"]["pretrain_jsonl_sha256"]
    (pack / "metadata.json").write_text(json.dumps(meta))
    return ["pretrain", "--pack-dir", str(pack), "--output", str(i.tmp / "base.pt"), "--steps", "2"]


def _build_pack(i: Inputs, source: bytes | None, *extra: str) -> list[str]:
    argv = ["build-pack", "--output-dir", str(i.tmp / "newpack"), "--no-progress", *extra]
    if source is not None:
        (i.tmp / "src.jsonl").write_bytes(source)
        argv += ["--source", "jsonl", "--path", str(i.tmp / "src.jsonl"), "--num-tasks", "1",
                 "--min-usable-per-task", "4", "--train-per-task", "2", "--eval-per-task", "2"]
    return argv


def _occupied_output_dir(i: Inputs) -> list[str]:
    (i.tmp / "newpack").mkdir()
    (i.tmp / "newpack" / "notes.txt").write_text("someone's notes")
    return _build_pack(i, rows(6))


@dataclass(frozen=True)
class Case:
    group: str
    what: str  # the bad input, for the table
    argv: Callable[[Inputs], list[str]]
    problem: str  # the message must contain this (it names the problem) ...
    fix: str  # ... and this (it names the fix)


CASES = [
    # -- config: keys, types, ranges, presets
    Case("config", "unknown key `model.hidden=32`", lambda i: i.toy("model.hidden=32"),
         "unknown key 'model.hidden'", "valid: dropout"),
    Case("config", "wrong type `train.batch_size=four`", lambda i: i.toy("train.batch_size=four"),
         "train.batch_size='four' has the wrong type", "expected int"),
    Case("config", "out of range `train.batch_size=0`", lambda i: i.toy("train.batch_size=0"),
         "train.batch_size=0", "must be > 0"),
    Case("config", "value not among the choices `model.provider=gpt`", lambda i: i.toy("model.provider=gpt"),
         "model.provider='gpt'", "is not one of tiny, hf"),
    Case("config", "cross-field `experts.top_k=9` > `experts.num_experts=4`", lambda i: i.toy("experts.top_k=9"),
         "experts.top_k=9", "must be <= experts.num_experts=4"),
    Case("config", "unknown preset `ablation=no_such`", lambda i: i.toy("ablation=no_such"),
         "unknown preset ablation=no_such", "choose one of"),
    Case("config", "unknown preset `benchmark=nope`", lambda i: i.toy("benchmark=nope"),
         "unknown preset benchmark=nope", "choose one of"),
    Case("config", "override without `=` (`model.seq_len 96`)", lambda i: i.toy("model.seq_len"),
         "override 'model.seq_len'", "group=preset or dotted.key=value"),
    Case("config", "a group set as a value `consolidation.refresh=1`", lambda i: i.toy("consolidation.refresh=1"),
         "is a group of keys", "set one of its keys"),
    Case("cli", "unknown command `trian`", lambda i: ["trian"], "unknown command 'trian'", "choose one of"),
    # -- data files and packs
    Case("data", "`benchmark.local_path` does not exist", lambda i: i.train_file(b"", f"benchmark.local_path={i.tmp}/no.jsonl"),
         "does not exist", "benchmark.local_path"),
    Case("data", "empty data file", lambda i: i.train_file(b""), "holds no records", "benchmark.local_path"),
    Case("data", "a line that is not UTF-8 (latin-1 `caf\\xe9`)",
         lambda i: i.train_file(rows(3) + b'{"task": "t0", "instruction": "caf\xe9", "output": "x"}\n'),
         "data.jsonl:4: not valid UTF-8", "re-save the file as UTF-8"),
    Case("data", "malformed JSON line", lambda i: i.train_file(rows(3) + b'{"task": "t0", "instruction": \n'),
         "data.jsonl:4: malformed JSON", "fix or remove the line"),
    Case("data", "a line that is a JSON list, not an object", lambda i: i.train_file(rows(3) + b"[1, 2]\n"),
         "data.jsonl:4: expected a JSON object", "fix or remove the line"),
    Case("data", "wrong field name `benchmark.prompt_field=question`",
         lambda i: i.train_file(rows(), "benchmark.prompt_field=question"),
         "data.jsonl:1 (field 'question'): missing field", "benchmark.prompt_field"),
    Case("data", "field of the wrong type (`instruction: 7`)",
         lambda i: i.train_file(rows(3) + b'{"task": "t0", "instruction": 7, "output": "x"}\n'),
         "data.jsonl:4 (field 'instruction'): expected text, got int", "fix the record"),
    Case("data", "record without a task label",
         lambda i: i.train_file(rows(3) + b'{"instruction": "say", "output": "x"}\n'),
         "record has no task label", "benchmark.task_field"),
    Case("data", "target ids over the vocabulary cap (HF, `model.vocab_size=10`)",
         lambda i: i.train_file(b"".join(b'{"task": "t", "instruction": "say %s", "output": "low"}\n' % w
                                         for w in (b"yes", b"no", b"high", b"low")),
                                "model.provider=hf", f"model.hf_model_name={i.tokenizer_dir}",
                                "model.hf_local_files_only=true", "model.vocab_size=10", "model.seq_len=16"),
         "target token id 11 >= model.vocab_size=10", "set model.vocab_size=0 or > 11"),
    Case("pack", "pack file tampered (checksum mismatch)",
         lambda i: i.train_on(i.copy_pack(append_line("train.jsonl", rows(1, "synth_x")))),
         "does not match metadata.json", "rebuild the pack (build-pack) or set benchmark.verify_checksums=false"),
    Case("pack", "pack without checksums in metadata.json",
         lambda i: i.train_on(i.copy_pack(edit_metadata(lambda m: m.pop("checksums")))),
         "records no checksums", "rebuild the pack (build-pack) or set benchmark.verify_checksums=false"),
    Case("pack", "pack missing one file's checksum",
         lambda i: i.train_on(i.copy_pack(edit_metadata(lambda m: m["checksums"].pop("eval_jsonl_sha256")))),
         "records no checksum eval_jsonl_sha256", "rebuild the pack (build-pack) or set benchmark.verify_checksums=false"),
    Case("pack", "pack file missing (eval.jsonl deleted)",
         lambda i: i.train_on(i.copy_pack(lambda p: (p / "eval.jsonl").unlink())),
         "eval.jsonl: listed in metadata.json but missing", "rebuild the pack (build-pack)"),
    Case("pack", "pack with a duplicate task name in `selected_tasks`",
         lambda i: i.train_on(i.copy_pack(edit_metadata(lambda m: m["selected_tasks"].append(m["selected_tasks"][0])))),
         "is listed twice", "rebuild the pack (build-pack)"),
    Case("pack", "metadata.json is not JSON",
         lambda i: i.train_on(i.copy_pack(lambda p: (p / "metadata.json").write_text("{oops"))),
         "metadata.json:1: malformed JSON", "rebuild the pack (build-pack)"),
    Case("pack", "metadata.json is not UTF-8",
         lambda i: i.train_on(i.copy_pack(lambda p: (p / "metadata.json").write_bytes(b'{"x": "\xff"}'))),
         "metadata.json:1: not valid UTF-8", "re-save the file as UTF-8"),
    Case("pack", "more tasks asked for than the pack has (`benchmark.num_tasks=5`)",
         lambda i: i.train_on(i.copy_pack(), "benchmark.num_tasks=5"),
         "the pack has 3 tasks but benchmark.num_tasks=5", "set benchmark.num_tasks <= 3"),
    Case("pack", "a pack line that is not UTF-8 (checksums off)",
         lambda i: i.train_on(i.copy_pack(append_line("train.jsonl", b'{"task": "x\xe9"}\n')),
                              "benchmark.verify_checksums=false"),
         "train.jsonl:31: not valid UTF-8", "re-save the file as UTF-8"),
    # -- run directories and checkpoints
    Case("run dir", "output dir holds a completed run", lambda i: i.toy(out=i.finished_run),
         "already holds a completed run", "choose another logging.output_dir"),
    Case("run dir", "checkpoint dir from another config (`seed=7` on a seed-42 run)",
         lambda i: i.toy("seed=7", out=i.resumable_run()),
         "holds a run with a different config (differs in: seed)", "use another logging.output_dir"),
    Case("run dir", "checkpoints copied into a fresh dir (no validated_config.json)", _checkpoints_without_config,
         "holds checkpoints but no readable validated_config.json", "use another logging.output_dir"),
    Case("run dir", "every checkpoint truncated", lambda i: i.toy(out=_break_all_checkpoints(i.resumable_run())),
         "no intact checkpoint in", "delete"),
    Case("run dir", "`--restart-stale` (the pipeline's) on a non-empty folder that holds no run",
         _restart_stale_on_a_folder_without_a_run, "is not empty and holds no run", "choose another logging.output_dir"),
    # -- build-pack and pretrain
    Case("build-pack", "option of the wrong type (`--num-tasks abc`)",
         lambda i: _build_pack(i, None, "--source", "synthetic", "--num-tasks", "abc"),
         "argument --num-tasks: invalid int value: 'abc'", "build-pack --help"),
    Case("build-pack", "`--source jsonl` without `--path`", lambda i: _build_pack(i, None, "--source", "jsonl"),
         "--source jsonl needs --path", "--path FILE.jsonl"),
    Case("build-pack", "source line that is not UTF-8",
         lambda i: _build_pack(i, b'{"task": "t", "instruction": "caf\xe9", "output": "x"}\n'),
         "src.jsonl:1: not valid UTF-8", "re-save the file as UTF-8"),
    Case("build-pack", "source without enough usable rows", lambda i: _build_pack(i, rows(3)),
         "only 0 of 1 tasks have >= 4 usable rows", "lower --min-usable-per-task or --num-tasks"),
    Case("build-pack", "source row missing a field",
         lambda i: _build_pack(i, b'{"task": "t", "instruction": "say"}\n'),
         "src.jsonl:1 (field 'output'): missing field", "fix the record"),
    Case("build-pack", "output dir is a non-empty folder that is not a pack", _occupied_output_dir,
         "refusing to overwrite it", "choose an empty --output-dir"),
    Case("pretrain", "pack without pretrain.jsonl", _pack_without_pretrain,
         "pretrain.jsonl: no such file", "build the pack with --source synthetic"),
    Case("pretrain", "required option missing (`--output`)",
         lambda i: ["pretrain", "--pack-dir", str(i.pack)],
         "the following arguments are required: --output", "pretrain --help"),
]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(argv: list[str], capfd) -> tuple[int, str]:
    """main(argv) with stderr as a process has it (warnings printed, not collected by pytest)."""
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        code = main(argv)
    return code, capfd.readouterr().err


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


SEEN: dict[str, tuple[Case, int, str]] = {}


def case_id(case: Case) -> str:
    return f"{case.group}:{case.what}"


@pytest.fixture
def inputs(tmp_path, pack, tokenizer_dir, finished_run) -> Inputs:
    return Inputs(tmp_path / "case", pack, tokenizer_dir, finished_run)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_one_line_exit_2_nothing_written(case: Case, inputs: Inputs, capfd):
    inputs.tmp.mkdir()
    argv = case.argv(inputs)
    watched = [inputs.tmp, inputs.finished_run]
    before = [snapshot(root) for root in watched]
    code, err = run_main(argv, capfd)
    SEEN[case_id(case)] = (case, code, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert case.problem in line, f"the message does not name the problem ({case.problem!r}): {line}"
    assert case.fix in line, f"the message does not name the fix ({case.fix!r}): {line}"
    assert code == 2, line
    assert [snapshot(root) for root in watched] == before, "a bad input must not write (or remove) anything"


def test_there_are_at_least_25_bad_inputs():
    assert len(CASES) >= 25


def test_the_good_inputs_the_cases_break_do_work(inputs: Inputs, capfd):
    """The control: the unbroken pack and data file train (so each case fails for its one bad thing)."""
    inputs.tmp.mkdir()
    code, err = run_main(inputs.train_on(inputs.pack), capfd)
    assert code == 0, err
    shutil.rmtree(inputs.tmp / "run")
    code, err = run_main(inputs.train_file(rows()), capfd)
    assert code == 0, err


def test_pack_without_checksums_trains_unverified_when_verification_is_off(inputs: Inputs, capfd):
    """benchmark.verify_checksums=false on a pack without checksums: it trains, and run_metadata.json says so."""
    inputs.tmp.mkdir()
    pack = inputs.copy_pack(edit_metadata(lambda m: m.pop("checksums")))
    code, err = run_main(inputs.train_on(pack, "benchmark.verify_checksums=false"), capfd)
    assert code == 0, err
    source = json.loads((inputs.tmp / "run" / "run_metadata.json").read_text())["benchmark"]["source"]
    assert source["pack"]["checksums"] is None and source["pack"]["checksums_verified"] is False


PROCESS_CASES = ["config:unknown key `model.hidden=32`", "pack:pack without checksums in metadata.json",
                 "build-pack:option of the wrong type (`--num-tasks abc`)"]


def test_real_processes_agree_with_main(inputs: Inputs, capfd):
    """`python -m biollm_cls.cli ...` exits 2 with the same single line as main(argv)."""
    inputs.tmp.mkdir()
    by_id = {case_id(c): c for c in CASES}
    procs = []
    for n, name in enumerate(PROCESS_CASES):
        sub = Inputs(inputs.tmp / str(n), inputs.pack, inputs.tokenizer_dir, inputs.finished_run)
        sub.tmp.mkdir()
        argv = by_id[name].argv(sub)
        procs.append((name, sub, argv, subprocess.Popen([sys.executable, "-m", "biollm_cls.cli", *argv],
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for name, sub, _argv, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and by_id[name].problem in err, (name, err)
        assert not (sub.tmp / "run").exists() and not (sub.tmp / "newpack").exists()


def test_a_suite_config_that_fails_the_schema_is_one_line_and_exit_2(tmp_path):
    """A suite config that fails workflow/schemas/config.schema.yaml (`seeds: seven`): one `error:` line naming
    the key, the problem and where the fix goes, exit code 2, no traceback, nothing written in the working copy."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    bad = yaml.safe_load((ROOT / "config" / "ci.yaml").read_text())
    bad["seeds"] = "seven"
    (work / "bad.yaml").write_text(yaml.safe_dump(bad))
    before = snapshot(work)
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", "bad.yaml"], cwd=work,
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: suite config seeds: 'seven' is not of type 'array'; fix it in the --configfile "
                      "(the keys and their types: workflow/schemas/config.schema.yaml)"], out
    assert "Traceback" not in out and "ValidationError" not in out
    assert snapshot(work) == before


@pytest.fixture(scope="module", autouse=True)
def write_table_when_asked():
    """BIOLLM_BAD_INPUTS_TABLE=path: after the module, write the markdown table of the messages seen."""
    yield
    target = os.environ.get("BIOLLM_BAD_INPUTS_TABLE")
    if not target:
        return
    lines = ["| # | command | bad input | stderr (one line) | exit |", "|---|---|---|---|---|"]
    for n, case in enumerate(CASES, start=1):
        if case_id(case) not in SEEN:
            continue
        _, code, err = SEEN[case_id(case)]
        message = err.strip().replace("|", "\\|")
        for root in ("/tmp/",):
            message = _shorten(message, root)
        command = "train" if case.group in ("config", "data", "pack", "run dir") else case.group
        code_span = f"`` {message} ``" if "`" in message else f"`{message}`"
        lines.append(f"| {n} | `{command}` | {case.what} | {code_span} | {code} |")
    Path(target).write_text("\n".join(lines) + "\n")


def _shorten(message: str, root: str) -> str:
    """Temp paths -> `.../<last two parts>`, so the table reads like a user's session."""
    import re

    return re.sub(r"/tmp/\S*?/((?:[^/\s]+/)?[^/\s]+?)(?=[\s:;,)'\"]|$)", r".../\1", message)
