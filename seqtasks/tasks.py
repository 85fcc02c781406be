"""Synthetic byte-level sequence tasks from the seed write-ups, generated on the fly.

Every sample is a fixed-length string `question + answer`; the model reads it with the answer region
replaced by byte 0 and must reproduce the whole string. Metrics look at the answer region (the "mask").

- selcopy:  letters scattered in a space of dots, answer = the letters in order    `A....D.C..B..:ADCB`
- vselcopy: a program over letter items: `x>y` swaps items x and y (1-based), `-x` moves item x onto a
            stack, `+x` pops the stack into position x                             `EJACQ: 1>2, -1, +3: EAJCQ`
- piglatin: an English word and its Pig Latin (vowel-initial words add "way"; otherwise the leading
            consonant cluster moves to the end, then "ay"; hyphenated words per part) `brown:ownbray`
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

LETTERS = string.ascii_uppercase
VOWELS = set("aeiou")
CORPUS = Path(__file__).resolve().parent.parent / "data" / "devil_jargon.txt"


def check_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")


def int_range(name: str, v) -> tuple[int, int]:
    """An int n -> (n, n); a [min, max] pair -> (min, max)."""
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (list, tuple)) else ()
    if len(pair) != 2:
        raise ValueError(f"{name} must be an integer or a [min, max] pair, got {v!r}")
    for x in pair:
        check_int(name, x)
    return pair


@dataclass
class Sample:
    text: str  # full string, fixed length for the task
    mask_start: int  # the answer region is text[mask_start:]


class Task:
    name = "task"
    seq_len = 0

    def sample(self, rng: random.Random) -> Sample:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


class SelectiveCopy(Task):
    name = "selcopy"

    def __init__(self, num_items: int = 10, area: int = 40, letters: str = LETTERS):
        check_int("num_items", num_items)
        check_int("area", area)
        if not 1 <= num_items <= area:
            raise ValueError(f"num_items must be in [1, area={area}], got {num_items}")
        if num_items > len(letters):
            raise ValueError(f"num_items ({num_items}) must not exceed the {len(letters)} distinct letters")
        self.num_items, self.area, self.letters = num_items, area, letters
        self.seq_len = area + 1 + num_items

    def sample(self, rng):
        items = rng.sample(self.letters, self.num_items)
        slots = sorted(rng.sample(range(self.area), self.num_items))
        q = ["."] * self.area
        for s, ch in zip(slots, items):
            q[s] = ch
        return Sample("".join(q) + ":" + "".join(items), self.area + 1)

    def describe(self):
        return dict(nitem=self.num_items, area=self.area)


def run_program(items: str, ops: list[str]) -> str:
    """Execute a very-selective-copying program; raises ValueError on an invalid step."""
    mem, stack = list(items), []
    for op in ops:
        if ">" in op:
            a, b = (int(v) - 1 for v in op.split(">"))
            if not (0 <= a < len(mem) and 0 <= b < len(mem)):
                raise ValueError(f"swap {op} outside {len(mem)} items")
            mem[a], mem[b] = mem[b], mem[a]
        elif op.startswith("-"):
            i = int(op[1:]) - 1
            if not 0 <= i < len(mem):
                raise ValueError(f"remove {op} outside {len(mem)} items")
            stack.append(mem.pop(i))
        elif op.startswith("+"):
            i = int(op[1:]) - 1
            if not stack or not 0 <= i <= len(mem):
                raise ValueError(f"insert {op} with empty stack or outside {len(mem) + 1} positions")
            mem.insert(i, stack.pop())
        else:
            raise ValueError(f"unknown operation {op!r}")
    return "".join(mem)


def parse_program(text: str) -> tuple[str, list[str], str]:
    """'EJACQ: 1>2, -1, +3: EAJCQ' -> ('EJACQ', ['1>2', '-1', '+3'], 'EAJCQ')."""
    items, ops, answer = (p.strip() for p in text.split(":"))
    return items, [o.strip() for o in ops.split(",")], answer


class VerySelectiveCopy(Task):
    name = "vselcopy"

    def __init__(self, num_items=(2, 5), num_ops=(1, 5), ops="swap,remove,insert"):
        self.items_range, self.ops_range = int_range("num_items", num_items), int_range("num_ops", num_ops)
        self.kinds = [o.strip() for o in ops.split(",") if o.strip()] if isinstance(ops, str) else []
        if not set(self.kinds) <= {"swap", "remove", "insert"} or not self.kinds:
            raise ValueError(f"ops must be a comma list of swap, remove, insert; got {ops!r}")
        if self.kinds == ["insert"]:
            raise ValueError("ops 'insert' needs 'remove' too (an insert pops what a remove pushed)")
        if not 1 <= self.items_range[0] <= self.items_range[1] <= 9:
            raise ValueError(f"num_items must be within 1..9 (single-digit positions), got {num_items}")
        if not 1 <= self.ops_range[0] <= self.ops_range[1]:
            raise ValueError(f"num_ops must be >= 1 (a number or a [min, max] range), got {num_ops}")
        n, k = self.items_range[1], self.ops_range[1]
        # items ": " ops (each <= 3 chars, ", " between) ": " answer (<= n)
        self.seq_len = n + 2 + (3 * k + 2 * (k - 1)) + 2 + n

    def _op(self, rng, mem_len, stack_len):
        choices = []
        if "swap" in self.kinds and mem_len >= 2:
            choices.append("swap")
        if "remove" in self.kinds and mem_len >= 2:
            choices.append("remove")
        if "insert" in self.kinds and stack_len > 0:
            choices.append("insert")
        if not choices:  # e.g. remove-only once one item is left: the program ends early
            return None
        kind = rng.choice(choices)
        if kind == "swap":
            a, b = rng.sample(range(1, mem_len + 1), 2)
            return f"{a}>{b}", 0, 0
        if kind == "remove":
            return f"-{rng.randint(1, mem_len)}", -1, 1
        return f"+{rng.randint(1, mem_len + 1)}", 1, -1

    def sample(self, rng):
        n = rng.randint(*self.items_range)
        items = "".join(rng.sample(LETTERS, n))
        ops, mem_len, stack_len = [], n, 0
        for _ in range(rng.randint(*self.ops_range)):
            step = self._op(rng, mem_len, stack_len)
            if step is None:
                break
            op, dm, ds = step
            ops.append(op)
            mem_len, stack_len = mem_len + dm, stack_len + ds
        question = f"{items}: {', '.join(ops)}: "
        text = (question + run_program(items, ops)).ljust(self.seq_len)
        return Sample(text, len(question))

    def describe(self):
        return dict(nitem=26, len=",".join(map(str, self.items_range)), nops=",".join(map(str, self.ops_range)))


def pig_latin(word: str) -> str:
    if "-" in word:
        return "-".join(pig_latin(part) for part in word.split("-"))
    if not word:
        return word
    if word[0] in VOWELS:
        return word + "way"
    i = 0
    while i < len(word) and word[i] not in VOWELS:
        i += 1
    return word[i:] + word[:i] + "ay"


def corpus_words(max_len: int = 12, min_len: int = 2) -> list[str]:
    text = CORPUS.read_text(encoding="utf-8", errors="replace").lower()
    words = set(re.findall(r"\b[a-z]+(?:-[a-z]+)?\b", text))
    return sorted(w for w in words if min_len <= len(w) <= max_len)


class PigLatin(Task):
    name = "piglatin"

    def __init__(self, max_len: int = 12, val_fraction: float = 0.1, seed: int = 0):
        check_int("max_len", max_len)
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (words have at least 2 letters), got {max_len}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        words = corpus_words(max_len)
        rng = random.Random(seed)
        rng.shuffle(words)
        n_val = max(1, int(len(words) * val_fraction))
        self.val_words, self.train_words = words[:n_val], words[n_val:]
        self.max_len = max_len
        self.seq_len = max_len + 1 + max_len + 3 + max_len // 2  # hyphenated words add "ay" per part

    def sample(self, rng, words=None):
        w = rng.choice(words or self.train_words)
        return Sample((w + ":" + pig_latin(w)).ljust(self.seq_len), len(w) + 1)

    def validation(self, n: int, rng: random.Random) -> list[Sample]:
        words = self.val_words if n >= len(self.val_words) else rng.sample(self.val_words, n)
        return [Sample((w + ":" + pig_latin(w)).ljust(self.seq_len), len(w) + 1) for w in words]

    def describe(self):
        return dict(words_train=len(self.train_words), words_val=len(self.val_words))


TASKS = {"selcopy": SelectiveCopy, "vselcopy": VerySelectiveCopy, "piglatin": PigLatin}


class Dataset:
    """A fixed validation set and an endless training stream that never yields a validation string.

    The task's sample space must hold the validation set with room to spare: num_val distinct samples
    must turn up within VAL_DRAWS_PER_SAMPLE * num_val draws, and at least MIN_FRESH_FRACTION of
    fresh draws must fall outside the validation set (checked on PROBE_DRAWS draws). Otherwise
    ValueError, before any training, instead of a training stream that can never fill a batch."""

    VAL_DRAWS_PER_SAMPLE = 20
    PROBE_DRAWS = 2000
    MIN_FRESH_FRACTION = 0.5

    def __init__(self, task: Task, num_val: int = 1000, seed: int = 0, val_task: Task | None = None):
        """val_task: draw the validation set from another task (e.g. seed 001: train on 2-5 operations,
        validate on 5); the training stream still never yields a validation string."""
        check_int("num_val", num_val)
        if num_val < 1:
            raise ValueError(f"num_val must be >= 1, got {num_val}")
        self.task = task
        val_task = val_task or task
        rng = random.Random(10_000 + seed)
        if isinstance(val_task, PigLatin):  # held out by word, so training never meets a validation word
            self.val = val_task.validation(num_val, rng)
        else:
            seen, self.val = set(), []
            for _ in range(num_val * self.VAL_DRAWS_PER_SAMPLE):
                s = val_task.sample(rng)
                if s.text not in seen:
                    seen.add(s.text)
                    self.val.append(s)
                if len(self.val) == num_val:
                    break
            if len(self.val) < num_val:
                raise ValueError(
                    f"task {val_task.name} {val_task.describe()} gave only {len(self.val)} distinct samples in "
                    f"{num_val * self.VAL_DRAWS_PER_SAMPLE} draws, fewer than num_val={num_val}: its sample space "
                    f"cannot hold the validation set and leave fresh training samples. Lower num_val (to at most "
                    f"{len(self.val) // 2}) or enlarge the task (task_args)")
        self.val_texts = {s.text for s in self.val}
        probe = random.Random(20_000 + seed)
        fresh = sum(task.sample(probe).text not in self.val_texts for _ in range(self.PROBE_DRAWS))
        if fresh < self.MIN_FRESH_FRACTION * self.PROBE_DRAWS:
            raise ValueError(
                f"task {task.name} {task.describe()}: the {len(self.val)} validation samples cover "
                f"{1 - fresh / self.PROBE_DRAWS:.0%} of what the task draws (at most "
                f"{1 - self.MIN_FRESH_FRACTION:.0%} allowed), so training would mostly redraw held-out strings. "
                f"Lower num_val or enlarge the task (task_args)")
        self.rng = random.Random(seed)

    def train_samples(self, n: int) -> list[Sample]:
        out, rejected = [], 0
        while len(out) < n:
            s = self.task.sample(self.rng)
            if s.text not in self.val_texts:  # held-out strings never reach training
                out.append(s)
            else:
                rejected += 1
                if rejected > 1000 * n:  # a guard against a hang; the constructor's probe makes it unreachable
                    raise RuntimeError(f"{rejected} draws for a batch of {n} were validation samples; the task's "
                                       f"sample space is exhausted")
        return out


def encode(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bytes -> (inputs with the answer region zeroed, targets, answer mask), all (B, L)."""
    L = max(len(s.text.encode()) for s in samples)
    targets = torch.zeros(len(samples), L, dtype=torch.long)
    mask = torch.zeros(len(samples), L, dtype=torch.bool)
    for i, s in enumerate(samples):
        b = s.text.encode()
        targets[i, :len(b)] = torch.tensor(list(b))
        mask[i, s.mask_start:len(b)] = True
    return targets.masked_fill(mask, 0), targets, mask
