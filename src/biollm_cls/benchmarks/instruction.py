"""The instruction benchmark: a continual stream of instruction-following tasks from JSONL/JSON or a dataset.

Each record has a prompt, a response and a task label (``benchmark.prompt_field``, ``response_field``,
``task_field``). Tasks are trained one after the other, each for exactly ``switch_every`` steps, in
training order: a pack's order (``metadata.json``: the builder's seeded selection) when the data comes
from a pack, otherwise the reference's selection (labels sorted; when there are more than ``num_tasks``,
shuffled with ``Random(task_selection_seed)``; the first ``num_tasks``).

Encoding of one example (fixes the reference's defects, REFERENCE.md 7.1.3 and 7.1.12):
  full = template-head + prompt + template-tail (the "### Response:" marker) + response + EOS
  input_ids = full[:-1], targets = full[1:] (next-token), right-padded to ``model.seq_len`` with pad_id.
* Token ids are real ids: never reduced ``mod V``. With an HF model restricted to its first N output ids
  (``model.vocab_size = N``), a *target* id >= N is refused with an error; inputs keep their ids.
* When too long, the prompt *body* is cut (its beginning goes: the instance input sits at its end), never
  the template's marker; the response keeps up to half of the room; EOS ends every response that fits.
* ``attention_mask`` is False on padding; padding targets are IGNORE, and so are prompt targets when
  ``ignore_prompt_loss``. Examples with no supervised token are dropped and counted (``describe()``).
* Held-out data per task comes from ``eval_local_path`` (at most ``heldout_per_task`` rows) or is carved
  from the training rows; a training example whose (task, instruction) also appears held out is removed
  and counted, so held-out scores measure generalisation, not recall.
Batches are a pure function of ``(seed, step)`` (``step_generator``), so every ablation sees the same data.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from biollm_cls.benchmarks.base import IGNORE, Batch, step_generator, task_at
from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.packs.builder import is_pack, pack_dir, read_metadata, verify_pack
from biollm_cls.benchmarks.packs.sources import read_json_records
from biollm_cls.benchmarks.tokenizers import TextTokenizer, build_tokenizer
from biollm_cls.config.schema import BenchmarkConfig, ConfigError, RunConfig
from biollm_cls.run_io import file_sha256

__all__ = ["Example", "InstructionStream", "PromptEncoder", "build_instruction_stream", "resolve_vocab_size"]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    response: str
    location: str  # "file:line" or "dataset[split] row i", for messages


@dataclass
class Counts:
    """What loading and encoding skipped, cut or removed (reported by describe())."""

    records_read: int = 0
    empty_skipped: int = 0  # prompt or response empty after stripping
    no_supervised_dropped: int = 0  # no room left for a single response token
    prompts_truncated: int = 0
    responses_truncated: int = 0  # response (and its EOS) cut at seq_len
    duplicates_removed: int = 0  # training rows whose (task, instruction) is held out


# ---- encoding ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # prefix + response (+ EOS): at most seq_len + 1 ids
    n_prefix: int  # ids before the first response id


def split_template(template: str) -> tuple[str, str]:
    """(head, tail) around the single `{prompt}` placeholder; the tail ends with the response marker."""
    if template.count("{prompt}") != 1:
        raise ConfigError(f"benchmark.prompt_template={template!r} must contain {{prompt}} exactly once")
    head, tail = template.split("{prompt}")
    return head, tail


class PromptEncoder:
    """Encodes (prompt, response) pairs into at most seq_len + 1 ids, keeping the response marker."""

    def __init__(self, tokenizer: TextTokenizer, template: str, seq_len: int, counts: Counts | None = None):
        self.tok = tokenizer
        self.head, self.tail = split_template(template)
        self.max_ids = seq_len + 1  # input = ids[:-1], targets = ids[1:]
        self.counts = counts if counts is not None else Counts()

    def encode(self, prompt: str, response: str) -> Encoded | None:
        """None when not even one response token fits (counted as dropped)."""
        resp = self.tok.encode(response) + [self.tok.eos_id]
        prefix = self.tok.encode(self.head + prompt + self.tail, special=True)
        if len(prefix) + len(resp) <= self.max_ids:
            return Encoded(prefix + resp, len(prefix))
        head = self.tok.encode(self.head, special=True)
        body, tail = self.tok.encode(prompt), self.tok.encode(self.tail)
        room = self.max_ids - len(head) - len(tail)  # ids left for body + response
        if room < 2:
            self.counts.no_supervised_dropped += 1
            return None
        reserve = min(len(resp), max(1, room // 2))
        n_body = min(len(body), room - reserve)
        n_resp = min(len(resp), room - n_body)
        self.counts.prompts_truncated += n_body < len(body)
        self.counts.responses_truncated += n_resp < len(resp)
        kept_prefix = head + body[len(body) - n_body:] + tail  # cut the body's beginning, keep the marker
        return Encoded(kept_prefix + resp[:n_resp], len(kept_prefix))


@dataclass
class TaskData:
    """Encoded rows of one task, right-padded to seq_len."""

    input_ids: torch.Tensor  # (N, T) long
    targets: torch.Tensor  # (N, T) long, IGNORE where not supervised
    attention_mask: torch.Tensor  # (N, T) bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def to_task_data(encoded: list[Encoded], seq_len: int, pad_id: int, ignore_prompt_loss: bool) -> TaskData:
    n = len(encoded)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)  # (N, T)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)  # (N, T)
    mask = torch.zeros((n, seq_len), dtype=torch.bool)  # (N, T)
    for i, enc in enumerate(encoded):
        length = len(enc.ids) - 1
        input_ids[i, :length] = torch.tensor(enc.ids[:-1])
        row = torch.tensor(enc.ids[1:])  # (length,) next-token targets
        if ignore_prompt_loss:
            row[: enc.n_prefix - 1] = IGNORE  # first supervised position predicts the first response id
        targets[i, :length] = row
        mask[i, :length] = True
    return TaskData(input_ids, targets, mask)


# ---- vocabulary --------------------------------------------------------------------------------------


def vocab_sizes(cfg: RunConfig, tok: TextTokenizer) -> tuple[int, int]:
    """(ids the inputs may use, bound on target ids). Raises ConfigError naming the value to set."""
    n = cfg.model.vocab_size
    if cfg.model.provider == "tiny":
        if 0 < n < tok.vocab_size:
            raise ConfigError(
                f"model.vocab_size={n} is smaller than the byte tokenizer's {tok.vocab_size} ids: set "
                f"model.vocab_size=0 (use the tokenizer's size) or >= {tok.vocab_size}"
            )
        return tok.vocab_size, tok.vocab_size
    if n > 0 and tok.eos_id >= n:
        raise ConfigError(
            f"model.vocab_size={n} leaves out the tokenizer's eos id {tok.eos_id}, which ends every response: "
            f"set model.vocab_size=0 (the whole vocabulary) or > {tok.eos_id}"
        )
    return tok.vocab_size, n or tok.vocab_size


def resolve_vocab_size(cfg: RunConfig, stream: Any) -> int:
    """The model's vocabulary: `model.vocab_size`, or the stream's (tokenizer's) size when it is 0."""
    return cfg.model.vocab_size or int(stream.vocab_size)


# ---- loading -----------------------------------------------------------------------------------------


def _text(record: Mapping, key: str, location: str, setting: str) -> str:
    if key not in record:
        raise DataError(f"{location} (field {key!r}): missing field {key!r}; set {setting} to the field that "
                        f"holds it (the record has: {', '.join(map(str, record)) or 'no fields'})")
    value = record[key]
    if isinstance(value, list):  # NI-style list of acceptable outputs: the first non-empty one
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{location} (field {key!r}): expected text, got {type(value).__name__}; fix the record "
                        f"(or point {setting} at a text field)")
    return value.strip()


def _task_label(record: Mapping, b: BenchmarkConfig, prompt: str, location: str) -> str:
    if b.task_field is None:
        return f"task_{int(hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:16], 16) % b.num_tasks}"
    value = record.get(b.task_field)
    if value is None or not str(value).strip():
        raise DataError(
            f"{location} (field {b.task_field!r}): record has no task label; set benchmark.task_field to the "
            f"field naming the task (or to null to hash prompts into num_tasks buckets)"
        )
    return str(value).strip()


def records_to_examples(records: Iterable[tuple[str, Mapping]], b: BenchmarkConfig,
                        counts: Counts) -> list[Example]:
    """(location, record) pairs -> examples; empty prompts/responses skipped and counted."""
    examples = []
    for location, record in records:
        counts.records_read += 1
        prompt = _text(record, b.prompt_field, location, "benchmark.prompt_field")
        response = _text(record, b.response_field, location, "benchmark.response_field")
        task = _task_label(record, b, prompt, location)
        if not prompt or not response:
            counts.empty_skipped += 1
            continue
        examples.append(Example(task, prompt, response, location))
    return examples


def read_records(path: str | None, b: BenchmarkConfig, limit: int) -> Iterator[tuple[str, Mapping]]:
    """(location, record) of a local .jsonl/.json file, a `save_to_disk` folder, or `benchmark.dataset_name`."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"benchmark data file {path} does not exist; set benchmark.local_path / "
                              f"benchmark.eval_local_path to an existing file (or build the pack first: build-pack)")
        if p.is_file():
            return ((f"{p}:{line}", rec) for line, rec in read_json_records(p, limit))
        import datasets

        dataset = datasets.load_from_disk(str(p))
        return _dataset_records(dataset, str(p), b.dataset_split, limit)
    if not b.dataset_name:
        raise ConfigError("benchmark.name=instruction needs benchmark.local_path or benchmark.dataset_name")
    import datasets

    try:
        dataset = datasets.load_dataset(b.dataset_name, b.dataset_config, split=b.dataset_split)
    except Exception as exc:  # the datasets library raises many types; keep one line
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"cannot load benchmark.dataset_name={b.dataset_name!r}: {first}") from None
    return _dataset_records(dataset, b.dataset_name, b.dataset_split, limit)


def _dataset_records(dataset: Any, name: str, split: str, limit: int) -> Iterator[tuple[str, Mapping]]:
    if isinstance(dataset, dict):  # a DatasetDict: pick the configured split
        if split not in dataset:
            raise ConfigError(f"{name} has no split {split!r} (benchmark.dataset_split); splits: {list(dataset)}")
        dataset = dataset[split]
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return ((f"{name}[{split}] row {i}", row) for i, row in enumerate(dataset))


# ---- task order and splits ---------------------------------------------------------------------------


def training_order(examples: list[Example], b: BenchmarkConfig, pack_tasks: list[str] | None,
                   source: str) -> list[str]:
    """The tasks, in training order (a pack's order, else the reference's seeded selection)."""
    sizes: dict[str, int] = {}
    for ex in examples:
        sizes[ex.task] = sizes.get(ex.task, 0) + 1
    need = max(1, b.min_examples_per_task)
    if pack_tasks is not None:
        if len(pack_tasks) < b.num_tasks:
            raise DataError(f"{source}: the pack has {len(pack_tasks)} tasks but benchmark.num_tasks={b.num_tasks}; "
                            f"set benchmark.num_tasks <= {len(pack_tasks)} (or build a pack with more tasks)")
        order = pack_tasks[: b.num_tasks]
        for task in order:
            if sizes.get(task, 0) < need:
                raise DataError(f"{source}: pack task {task!r} has {sizes.get(task, 0)} usable examples, "
                                f"fewer than benchmark.min_examples_per_task={b.min_examples_per_task}")
        return order
    candidates = sorted(task for task, n in sizes.items() if n >= need)
    if len(candidates) < b.num_tasks:
        raise DataError(
            f"{source}: {len(candidates)} of {len(sizes)} tasks have >= {need} examples, but benchmark.num_tasks="
            f"{b.num_tasks}; lower benchmark.num_tasks or benchmark.min_examples_per_task"
        )
    if len(candidates) > b.num_tasks:
        random.Random(b.task_selection_seed).shuffle(candidates)
    return candidates[: b.num_tasks]


def _key(ex: Example) -> tuple[str, str]:
    return ex.task, " ".join(ex.prompt.split())


def split_heldout(task: str, train: list[Example], evals: list[Example] | None, b: BenchmarkConfig,
                  counts: Counts, eval_source: str | None) -> tuple[list[Example], list[Example]]:
    """(train, held-out) of one task; training rows that duplicate a held-out instruction are removed."""
    if evals is not None:
        held = [ex for ex in evals if ex.task == task][: b.heldout_per_task]
        if not held:
            raise DataError(f"{eval_source}: no held-out rows for task {task!r} (benchmark.eval_local_path)")
    else:
        shuffled = list(train)
        random.Random(f"{b.task_selection_seed}:{task}").shuffle(shuffled)
        n_held = min(b.heldout_per_task, max(1, len(shuffled) // 5))
        held, train = shuffled[:n_held], shuffled[n_held:]
    held_keys = {_key(ex) for ex in held}
    kept = [ex for ex in train if _key(ex) not in held_keys]
    counts.duplicates_removed += len(train) - len(kept)
    return kept, held


# ---- the stream --------------------------------------------------------------------------------------


@dataclass
class StreamSpec:
    """Everything a stream needs besides its data: sizes, schedule and the facts it reports."""

    task_names: list[str]
    switch_every: int
    joint: bool
    seed: int
    vocab_size: int
    target_vocab_size: int
    pad_id: int
    seq_len: int
    facts: dict = field(default_factory=dict)


class InstructionStream:
    """A `ContinualStream` over encoded instruction data (see the module docstring)."""

    def __init__(self, spec: StreamSpec, train: list[TaskData], heldout: list[TaskData], tokenizer: TextTokenizer):
        self.spec, self.tokenizer = spec, tokenizer
        self.task_names = spec.task_names
        self.num_tasks, self.switch_every = len(spec.task_names), spec.switch_every
        self.vocab_size, self.target_vocab_size = spec.vocab_size, spec.target_vocab_size
        self.pad_id, self.seq_len = spec.pad_id, spec.seq_len
        self._heldout = heldout
        # all training rows in one table; task t owns rows offsets[t] .. offsets[t] + sizes[t] - 1
        self._inputs = torch.cat([d.input_ids for d in train])  # (N, T)
        self._targets = torch.cat([d.targets for d in train])  # (N, T)
        self._mask = torch.cat([d.attention_mask for d in train])  # (N, T)
        self._sizes = torch.tensor([len(d) for d in train])  # (num_tasks,)
        self._offsets = torch.cumsum(self._sizes, 0) - self._sizes  # (num_tasks,)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        last = self.num_tasks * self.switch_every
        if not 1 <= step <= last:
            raise ValueError(f"step {step} is outside the stream (1..{last})")
        gen = step_generator(self.spec.seed, step)
        if self.spec.joint:
            tasks = torch.randint(0, self.num_tasks, (batch_size,), generator=gen)  # (B,)
        else:
            tasks = torch.full((batch_size,), task_at(step, self.switch_every), dtype=torch.long)  # (B,)
        draw = torch.randint(0, 2**62, (batch_size,), generator=gen)  # (B,) uniform row, with replacement
        rows = self._offsets[tasks] + draw % self._sizes[tasks]  # (B,)
        return Batch(self._inputs[rows], self._targets[rows], self._mask[rows], tasks)

    def heldout(self, task_id: int, batch_size: int) -> Iterator[Batch]:
        data = self._heldout[task_id]
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            n = data.input_ids[sl].shape[0]
            yield Batch(data.input_ids[sl], data.targets[sl], data.attention_mask[sl],
                        torch.full((n,), task_id, dtype=torch.long))

    def describe(self) -> dict:
        return {
            "benchmark": "instruction", "num_tasks": self.num_tasks, "switch_every": self.switch_every,
            "task_names": list(self.task_names), "order": "joint" if self.spec.joint else "sequential",
            "vocab_size": self.vocab_size, "target_vocab_size": self.target_vocab_size, "pad_id": self.pad_id,
            "seq_len": self.seq_len, "tokenizer": self.tokenizer.describe(),
            "train_rows": {n: int(s) for n, s in zip(self.task_names, self._sizes.tolist(), strict=True)},
            "heldout_rows": {n: len(d) for n, d in zip(self.task_names, self._heldout, strict=True)},
            **self.spec.facts,
        }


# ---- construction ------------------------------------------------------------------------------------


def _pack_metadata(path: str | None, verify: bool) -> dict | None:
    if path is None or not Path(path).is_file() or not is_pack(path):
        return None
    return verify_pack(path) if verify else read_metadata(path)


def _source_facts(path: str | None, b: BenchmarkConfig, metadata: dict | None, verified: bool) -> dict:
    facts: dict[str, Any] = {"path": path} if path else {"dataset_name": b.dataset_name,
                                                         "dataset_config": b.dataset_config,
                                                         "dataset_split": b.dataset_split}
    if path and Path(path).is_file():
        facts["sha256"] = file_sha256(Path(path))
    if metadata is not None:
        facts["pack"] = {"dir": str(pack_dir(path)), "format": metadata.get("format"),
                         "checksums": metadata.get("checksums"), "checksums_verified": verified,
                         "include_definition": metadata.get("include_definition"),
                         "selected_tasks": metadata.get("selected_tasks")}
    return facts


def _eval_facts(b: BenchmarkConfig, metadata: dict | None, same_pack: bool) -> dict | str:
    if not b.eval_local_path:
        return "carved from the training rows"
    facts = _source_facts(b.eval_local_path, b, None if same_pack else metadata, b.verify_checksums)
    if same_pack:
        facts["pack"] = "same as source"
    return facts


def _encode_task(examples: list[Example], encoder: PromptEncoder, cfg: RunConfig, target_vocab: int,
                 what: str) -> TaskData:
    encoded = []
    for ex in examples:
        enc = encoder.encode(ex.prompt, ex.response)
        if enc is None:
            continue
        first = 0 if not cfg.benchmark.ignore_prompt_loss else enc.n_prefix
        bad = max(enc.ids[max(first, 1):], default=-1)
        if bad >= target_vocab:
            raise DataError(
                f"{ex.location}: target token id {bad} >= model.vocab_size={target_vocab} (the model predicts only "
                f"the first {target_vocab} ids); set model.vocab_size=0 or > {bad}"
            )
        encoded.append(enc)
    if not encoded:
        raise DataError(f"task {examples[0].task!r}: no {what} example has a supervised token at "
                        f"model.seq_len={cfg.model.seq_len}; raise model.seq_len")
    return to_task_data(encoded, cfg.model.seq_len, encoder.tok.pad_id, cfg.benchmark.ignore_prompt_loss)


def _load_eval(b: BenchmarkConfig, train_meta: dict | None) -> tuple[list[Example] | None, dict | None]:
    """(held-out examples or None, the eval file's pack metadata; verified unless it is the training pack)."""
    if not b.eval_local_path:
        return None, None
    same_pack = train_meta is not None and pack_dir(b.eval_local_path).resolve() == pack_dir(b.local_path).resolve()
    eval_meta = train_meta if same_pack else _pack_metadata(b.eval_local_path, b.verify_checksums)
    return records_to_examples(read_records(b.eval_local_path, b, 0), b, Counts()), eval_meta


def build_instruction_stream(cfg: RunConfig) -> InstructionStream:
    """Load, select, split and encode the configured instruction data (raises ConfigError / DataError)."""
    b = cfg.benchmark
    if b.task_field is None:
        warnings.warn("benchmark.task_field is null: tasks are hash buckets of the prompt, not real tasks",
                      RuntimeWarning, stacklevel=2)
    tok = build_tokenizer(cfg)
    vocab, target_vocab = vocab_sizes(cfg, tok)
    counts = Counts()
    train_meta = _pack_metadata(b.local_path, b.verify_checksums)
    source = b.local_path or f"{b.dataset_name}[{b.dataset_split}]"
    examples = records_to_examples(read_records(b.local_path, b, b.max_examples), b, counts)
    if counts.records_read == 0:
        raise DataError(f"{source}: holds no records (an empty file?); point benchmark.local_path at a JSONL file "
                        f"with one JSON object per line")
    evals, eval_meta = _load_eval(b, train_meta)
    order = training_order(examples, b, train_meta["selected_tasks"] if train_meta else None, source)
    by_task: dict[str, list[Example]] = {task: [] for task in order}
    for ex in examples:
        if ex.task in by_task:
            by_task[ex.task].append(ex)
    encoder = PromptEncoder(tok, b.prompt_template, cfg.model.seq_len, counts)
    train_data, held_data = [], []
    for task in order:
        train, held = split_heldout(task, by_task[task], evals, b, counts, b.eval_local_path)
        if not train:
            raise DataError(f"{source}: task {task!r} has no training rows left after holding out and deduplicating; "
                            f"give it more distinct instructions (or lower benchmark.heldout_per_task)")
        train_data.append(_encode_task(train, encoder, cfg, target_vocab, "training"))
        held_data.append(_encode_task(held, encoder, cfg, target_vocab, "held-out"))
    facts = {
        "source": _source_facts(b.local_path, b, train_meta, b.verify_checksums),
        "eval_source": _eval_facts(b, eval_meta, eval_meta is not None and eval_meta is train_meta),
        "prompt_template": b.prompt_template, "ignore_prompt_loss": b.ignore_prompt_loss,
        "tasks_available": len({ex.task for ex in examples}), "counts": asdict(counts),
    }
    spec = StreamSpec(order, b.switch_every, b.order == "joint", cfg.seed, vocab, target_vocab, tok.pad_id,
                      cfg.model.seq_len, facts)
    return InstructionStream(spec, train_data, held_data, tok)
