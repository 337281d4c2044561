"""Tokenizers, prompts and reward functions.

The built-in task needs no download: `ByteTokenizer` (one token per byte, plus pad/bos/eos) and single-digit addition
prompts such as `3+4=`, answered by a completion `7` followed by EOS. The tiny model first reads `noisy_sums`, where
the written answer is right only 40% of the time, so that GRPO starts from a weak policy rather than from random
weights: a randomly initialised model's last position barely sees the operands, and reinforcement learning alone
collapses it onto one constant answer long before it learns to look. `--dataset` reads prompts and reference answers
from a Hugging Face dataset (or a local file) instead, and `HFTokenizer` wraps a model's own tokenizer.

A reward function is called with keyword arguments, one list entry per completion, and returns one float (or None:
could not score, TRL's convention) per completion:

    def my_reward(*, prompts: list[str], completions: list[str], answers: list[str], stopped: list[bool], **kwargs):
        return [float(c.strip() == a) for c, a in zip(completions, answers)]

and is named on the command line as `--reward-funcs answer my_module:my_reward`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import SetupError, first_line

RewardFunction = Callable[..., Sequence[float | None]]


@dataclass(frozen=True)
class Example:
    """A prompt and the reference answer its completions are scored against."""

    prompt: str
    answer: str


class ByteTokenizer:
    """Token ids 0-255 are the bytes of the UTF-8 text; 256, 257 and 258 are pad, bos and eos."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.eos_token_id]

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.bos_token_id, *prompt.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the same three calls, with the chat template applied to prompts when asked
    for and available."""

    def __init__(self, tokenizer, chat_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.chat = chat_template and getattr(tokenizer, "chat_template", None) is not None
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of {tokenizer.name_or_path!r} has no eos_token_id: generation cannot stop")
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def encode_prompt(self, prompt: str) -> list[int]:
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def arithmetic_examples() -> list[Example]:
    """The built-in task: every sum of two digits that is itself one digit, `a+b=` -> `a + b` (55 prompts)."""
    return [Example(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10 - a)]


def noisy_sums(examples: Sequence[Example], n: int, accuracy: float, rng: random.Random) -> list[Example]:
    """`n` examples of the built-in task whose answer is right with probability `accuracy` and otherwise a random digit:
    the corpus that pretrains the tiny model into a weak, but not hopeless, starting policy."""
    out = []
    for _ in range(n):
        e = rng.choice(examples)
        out.append(e if rng.random() < accuracy else Example(e.prompt, str(rng.randint(0, 9))))
    return out


def _reference_answer(text: str) -> str:
    """The final answer of a reference solution: after GSM8K's `####` when present."""
    return text.split("####")[-1].strip().replace(",", "") if "####" in text else text.strip()


def dataset_examples(
    name: str, config: str | None, split: str, prompt_column: str, answer_column: str
) -> list[Example]:
    """Prompts and answers of a Hugging Face dataset, or of a local .json/.jsonl/.csv/.parquet file."""
    if importlib.util.find_spec("datasets") is None:
        raise SetupError(f"--dataset {name} needs the datasets package: pip install datasets (or the trainer extra)")
    import datasets

    suffix = Path(name).suffix.lstrip(".")
    local = Path(name).is_file() and suffix in ("json", "jsonl", "csv", "parquet")
    path_like = suffix in ("json", "jsonl", "csv", "parquet") or name.startswith(("./", "../", "/", "~"))
    if not local and path_like and not Path(name).is_dir():
        raise SetupError(f"--dataset {name}: no such .json, .jsonl, .csv or .parquet file (a Hub dataset is named "
                         "owner/name)")  # fmt: skip
    try:
        if local:
            ds = datasets.load_dataset("json" if suffix == "jsonl" else suffix, data_files=name, split=split)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the library's own: missing, unreachable, malformed, empty, no such split
        root = err
        while root.__cause__ is not None:  # the reader's own error (a JSON parse error) says more than the wrapper's
            root = root.__cause__
        raise SetupError(
            f"--dataset {name} (split {split!r}): cannot load it: {type(root).__name__}: {first_line(root, 'no rows')}"
        ) from err
    for column in (prompt_column, answer_column):
        if column not in ds.column_names:
            raise SetupError(
                f"dataset {name!r} has no column {column!r}; its columns are {', '.join(ds.column_names)} "
                "(set --prompt-column / --answer-column)"
            )
    examples = []
    for row, (p, a) in enumerate(zip(ds[prompt_column], ds[answer_column], strict=True)):
        for column, value in ((prompt_column, p), (answer_column, a)):
            if value is None or not str(value).strip():
                raise SetupError(
                    f"dataset {name!r}, row {row}: {column!r} is empty; every row needs a prompt and an answer"
                )
        examples.append(Example(str(p), _reference_answer(str(a))))
    return examples


class PromptSampler:
    """Batches of examples, shuffled once per epoch by the seed. Batch `i` depends only on `(seed, i)`, so a resumed
    run draws exactly the prompts the uninterrupted run would have."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        if not examples:
            raise SetupError("the dataset has no examples")
        self.examples = list(examples)
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batch(self, index: int, size: int) -> list[Example]:
        """The `index`-th batch of `size` examples."""
        n = len(self.examples)
        return [self.examples[self._order(k // n)[k % n]] for k in range(index * size, (index + 1) * size)]


# ---------------------------------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_reward(*, completions: list[str], answers: list[str], **kwargs) -> list[float]:
    """1 when the completion, stripped (or the content of its last `\\boxed{}`), is exactly the answer, else 0."""

    def final(text: str) -> str:
        boxed = _BOXED.findall(text)
        return boxed[-1].strip() if boxed else text.strip()

    return [float(final(c) == a.strip()) for c, a in zip(completions, answers, strict=True)]


def format_reward(*, completions: list[str], stopped: list[bool], **kwargs) -> list[float]:
    """Shaping for the arithmetic task: 0.5 when the completion starts with a digit, 0.5 more when it is only digits
    and stopped (ended with EOS) before the length limit."""
    return [
        0.5 * bool(_DIGITS.match(c)) + 0.5 * bool(s and _DIGITS.fullmatch(c))
        for c, s in zip(completions, stopped, strict=True)
    ]


def stop_reward(*, stopped: list[bool], **kwargs) -> list[float]:
    """1 when the completion ended with EOS before the length limit, else 0."""
    return [float(s) for s in stopped]


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def math_reward(*, completions: list[str], answers: list[str], **kwargs) -> list[float | None]:
    """1 when the completion's final answer is mathematically the reference answer, checked by `math-verify` when it
    is installed; without it, the last number of the completion (or its last `\\boxed{}`) must equal the answer's."""
    if importlib.util.find_spec("math_verify") is not None:
        from math_verify import parse, verify

        out: list[float | None] = []
        for c, a in zip(completions, answers, strict=True):
            gold = parse(a)
            out.append(None if not gold else float(verify(gold, parse(c))))
        return out

    def value(text: str) -> str | None:
        boxed = _BOXED.findall(text)
        return _last_number(boxed[-1]) if boxed else _last_number(text)

    out = []
    for c, a in zip(completions, answers, strict=True):
        gold = _last_number(a)
        if gold is None:
            out.append(None)
            continue
        got = value(c)
        out.append(float(got is not None and float(got) == float(gold)))
    return out


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "answer": answer_reward,
    "format": format_reward,
    "stop": stop_reward,
    "math": math_reward,
}


def reward_function(name: str) -> RewardFunction:
    """A built-in reward function by name, or `module:function` imported from the Python path."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" not in name:
        raise SetupError(
            f"unknown reward function {name!r}: use one of {', '.join(REWARD_FUNCTIONS)} or module:function"
        )
    module, _, attr = name.partition(":")
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        raise SetupError(f"reward function {name!r}: cannot import {module!r} ({err}); a module on the Python path "
                         "is named module:function, e.g. my_rewards:score") from err  # fmt: skip
    fn = getattr(imported, attr, None)
    if not callable(fn):
        raise SetupError(f"reward function {name!r}: {module} has no callable {attr!r}")
    return fn


def score(
    names: Sequence[str],
    functions: Sequence[RewardFunction],
    *,
    prompts: list[str],
    completions: list[str],
    answers: list[str],
    stopped: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward function: `[B, K]` fp32 rewards (NaN where a function returned None) and a `[B, K]` bool
    tensor that is True where a function returned a NaN or infinite number (the trainer then skips the step).

    Raises a clear error when a function raises, returns the wrong number of values, or a value that is not a number.
    """
    B = len(completions)
    rewards = torch.full((B, len(names)), math.nan)
    invalid = torch.zeros((B, len(names)), dtype=torch.bool)
    for k, (name, fn) in enumerate(zip(names, functions, strict=True)):
        try:
            values = fn(prompts=prompts, completions=completions, answers=answers, stopped=stopped)
        except Exception as e:
            raise RuntimeError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        try:
            values = list(values)
        except TypeError:
            raise TypeError(
                f"reward function {name!r} returned {type(values).__name__}; expected a list of floats"
            ) from None
        if len(values) != B:
            raise ValueError(
                f"reward function {name!r} returned {len(values)} values for {B} completions: it must return one "
                "value (or None) per completion"
            )
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, torch.Tensor) or type(v).__module__ == "numpy":  # a one-element tensor or array
                size = v.numel() if isinstance(v, torch.Tensor) else getattr(v, "size", 0)
                v = v.item() if size == 1 else v
            if not isinstance(v, numbers.Real):  # Python, NumPy and one-element tensor scalars, bools included
                raise TypeError(f"reward function {name!r} returned {v!r} for completion {i}; expected a float or None")
            rewards[i, k] = float(v)
            invalid[i, k] = not math.isfinite(float(v))
    return rewards, invalid
