"""The synthetic 8-task pack: the offline default benchmark, learnable by the tiny model on a CPU.

Eight deterministic, Natural-Instructions-style algorithmic tasks. Each prompt is one short line: a few
words of instruction and a small input (single digits, three-letter words), so prompt + answer stay under
~40 bytes with the byte tokenizer. The full natural-language definition of each task goes to
``metadata.json`` only. Four tasks read the same kind of input (a string of digits) and four read words,
so tasks that share an input format ask for different outputs: sequential training on one overwrites
the others, and forgetting is visible.

``pretrain.jsonl`` holds eight *other* families (copy, k-th item, last item, length, lowercase,
successor, max, min) that give a tiny base general in-context skills (reading, indexing, copying,
comparing) without ever showing it one of the eight continual tasks.

Generation is a pure function of ``(seed, task)`` (``random.Random`` seeded with a string, which Python
hashes with SHA-512, not with the per-process string hash), so two builds are byte-identical.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.packs.sources import RawRow, Source

# Three-letter words: short, lowercase, distinct.
WORDS = (
    "ant bag bat bed bee box bus cab cap car cat cow cup dog dot egg elk fan fig fox gem hat hen ink jam jar "
    "jet key kit leg log map mat mop mug net nut owl pan pen pig pin pot rat rug sun tap tea toy van web yak"
).split()

Example = tuple[str, str]  # (instruction line, answer)
Generator = Callable[[random.Random], Example]


def _digits(rng: random.Random, n: int, alphabet: str = "0123456789") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _words(rng: random.Random, n: int) -> list[str]:
    return rng.sample(WORDS, n)


# ---- the eight continual tasks -----------------------------------------------------------------------


def first_k(rng: random.Random) -> Example:
    k, xs = rng.randint(1, 5), _digits(rng, 6)
    return f"first {k}: {xs}", xs[:k]


def skip_k(rng: random.Random) -> Example:
    k, xs = rng.randint(1, 5), _digits(rng, 6)
    return f"skip {k}: {xs}", xs[k:]


def sort_digits(rng: random.Random) -> Example:
    xs = _digits(rng, 5)
    return f"sort: {xs}", "".join(sorted(xs))


def unique_digits(rng: random.Random) -> Example:
    xs = _digits(rng, 6, "12345")
    return f"unique: {xs}", "".join(dict.fromkeys(xs))


def add_sub(rng: random.Random) -> Example:
    a, b, c = (rng.randint(0, 9) for _ in range(3))
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    value = a + (b if op1 == "+" else -b)
    value = value + (c if op2 == "+" else -c)
    return f"calc: {a}{op1}{b}{op2}{c}", str(value)


def count_letter(rng: random.Random) -> Example:
    letter, word = rng.choice("abc"), _digits(rng, 6, "abcde")
    return f"count {letter}: {word}", str(word.count(letter))


def reverse_words(rng: random.Random) -> Example:
    words = _words(rng, 3)
    return f"reverse: {' '.join(words)}", " ".join(reversed(words))


def uppercase(rng: random.Random) -> Example:
    words = _words(rng, 2)
    return f"upper: {' '.join(words)}", " ".join(words).upper()


# name -> (generator, definition)
TASKS: dict[str, tuple[Generator, str]] = {
    "synth_first_k": (first_k, "In this task, you are given an integer i and a string A of digits. "
                               "Output the first i digits of A, in order."),
    "synth_skip_k": (skip_k, "In this task, you are given an integer i and a string A of digits. "
                             "Output every digit of A after the first i digits, in order."),
    "synth_sort_digits": (sort_digits, "In this task, you are given a string of digits. "
                                       "Output the same digits sorted in ascending order."),
    "synth_unique_digits": (unique_digits, "In this task, you are given a string of digits. Remove every "
                                           "repeated digit, keeping the first occurrence, and output the rest."),
    "synth_add_sub": (add_sub, "In this task, you are given an arithmetic expression of single-digit numbers "
                               "with '+' and '-'. Output its value."),
    "synth_count_letter": (count_letter, "In this task, you are given a letter and a word. "
                                         "Output how many times the letter occurs in the word."),
    "synth_reverse_words": (reverse_words, "In this task, you are given a list of words. "
                                           "Output the same words in reverse order."),
    "synth_uppercase": (uppercase, "In this task, you are given lowercase words. "
                                   "Output them in uppercase letters."),
}


# ---- pretraining families (disjoint from the eight) --------------------------------------------------


def copy_digits(rng: random.Random) -> Example:
    xs = _digits(rng, rng.randint(3, 7))
    return f"copy: {xs}", xs


def item_k(rng: random.Random) -> Example:
    xs = _digits(rng, 6)
    k = rng.randint(1, len(xs))
    return f"item {k}: {xs}", xs[k - 1]


def last_item(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        xs = _digits(rng, rng.randint(3, 7))
        return f"last: {xs}", xs[-1]
    words = _words(rng, rng.randint(2, 4))
    return f"last: {' '.join(words)}", words[-1]


def length(rng: random.Random) -> Example:
    xs = _digits(rng, rng.randint(1, 9), "abcdefghij")
    return f"len: {xs}", str(len(xs))


def lowercase(rng: random.Random) -> Example:
    words = _words(rng, rng.randint(1, 3))
    return f"lower: {' '.join(words).upper()}", " ".join(words)


def successor(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        x = rng.randint(0, 98)
        return f"next: {x}", str(x + 1)
    c = rng.choice("abcdefghijklmnopqrstuvwxy")
    return f"next: {c}", chr(ord(c) + 1)


def max_digit(rng: random.Random) -> Example:
    xs = _digits(rng, rng.randint(3, 7))
    return f"max: {xs}", max(xs)


def min_digit(rng: random.Random) -> Example:
    xs = _digits(rng, rng.randint(3, 7))
    return f"min: {xs}", min(xs)


PRETRAIN_FAMILIES: dict[str, Generator] = {
    "pre_copy": copy_digits, "pre_item_k": item_k, "pre_last": last_item, "pre_length": length,
    "pre_lowercase": lowercase, "pre_successor": successor, "pre_max": max_digit, "pre_min": min_digit,
}


# ---- generation --------------------------------------------------------------------------------------


def unique_examples(generate: Generator, n: int, seed: int, name: str) -> list[Example]:
    """n examples with distinct instructions, deterministic in (seed, name)."""
    rng = random.Random(f"{seed}:{name}")
    seen: dict[str, str] = {}
    for _ in range(50 * n):
        instruction, answer = generate(rng)
        seen.setdefault(instruction, answer)
        if len(seen) == n:
            return list(seen.items())
    raise DataError(f"synthetic task {name!r} has fewer than {n} distinct instructions; ask for fewer rows")


def _rows(per_task: int, seed: int) -> Iterator[RawRow]:
    for name, (generate, definition) in TASKS.items():
        for index, (instruction, answer) in enumerate(unique_examples(generate, per_task, seed, name)):
            yield RawRow(name, instruction, answer, definition, f"synthetic:{name}[{index}]")


def pretrain_rows(per_family: int, seed: int) -> list[dict]:
    """Rows of the pretraining families (repeats allowed: some families are small), seeded shuffle."""
    rows = []
    for name, generate in PRETRAIN_FAMILIES.items():
        rng = random.Random(f"{seed}:{name}")
        for _ in range(per_family):
            instruction, answer = generate(rng)
            rows.append({"task": name, "instruction": instruction, "output": answer})
    random.Random(f"{seed}:pretrain-order").shuffle(rows)
    return rows


def open_synthetic(per_task: int, seed: int, pretrain_per_family: int) -> Source:
    """The synthetic source: `per_task` distinct rows of each task, plus pretrain.jsonl rows."""
    info = {"kind": "synthetic", "generator_seed": seed, "rows_per_task": per_task,
            "pretrain_rows_per_family": pretrain_per_family, "pretrain_families": list(PRETRAIN_FAMILIES)}
    extra = {"pretrain.jsonl": pretrain_rows(pretrain_per_family, seed)} if pretrain_per_family > 0 else {}
    return Source(_rows(per_task, seed), per_task * len(TASKS), info, extra)
