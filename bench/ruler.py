"""Seeded RULER-style retrieval tasks over a natural-text haystack.

Four task kinds, each a prompt of about `length` tokens and one expected answer string:

- single_needle: one sentence "The special number for <key> is <7 digits>." hidden in the text;
  asked for that key's number.
- multi_key: four such sentences with different keys; asked for one of them (the others are
  distractors).
- multi_value: three sentences for the same key with different numbers; asked for all of them,
  in document order.
- variable_tracking: "VAR <a> = <5 digits>." then "VAR <b> = VAR <a>." and so on, spread over the
  text; asked for every variable that holds the number, in assignment order.

Scoring lives in bench/accuracy.py: the prompt is prefilled, the answer decoded teacher-forced,
and the answer counts as retrieved when the argmax at every answer position is the answer's
next token, which is exactly the condition for greedy decoding to emit it. Needles sit at
paragraph boundaries at seeded depths; the haystack paragraphs come from bench/corpus.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

TASKS = ("single_needle", "multi_key", "multi_value", "variable_tracking")

_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "mellow", "narrow", "olive", "proud", "quiet", "rapid", "silver", "tidy",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "ribbon",
    "saddle", "tunnel", "violin", "walnut",
)  # fmt: skip

INTRO = (
    "Read the following document carefully. A few sentences in it state special numbers or "
    "variable assignments; remember them, you will be asked about them at the end.\n\n"
)


@dataclass
class RetrievalSample:
    """One prompt and the answer that greedy decoding should produce right after it."""

    task: str
    seed: int
    prompt: str
    answer: str
    needles: list[str]
    depths: list[float] = field(default_factory=list)

    def describe(self) -> dict:
        return {"task": self.task, "seed": self.seed, "answer": self.answer, "depths": self.depths}


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _task_content(task: str, rng: random.Random) -> tuple[list[str], str, str]:
    """(needle sentences in document order, question, answer) for one task."""
    keys: set[str] = set()
    if task == "single_needle":
        key, value = _key(rng, keys), _number(rng, 7)
        needles = [f"The special number for {key} is {value}."]
        question = f"Question: What is the special number for {key}?\nAnswer: The special number for {key} is"
        return needles, question, f" {value}"
    if task == "multi_key":
        pairs = [(_key(rng, keys), _number(rng, 7)) for _ in range(4)]
        needles = [f"The special number for {key} is {value}." for key, value in pairs]
        key, value = pairs[rng.randrange(len(pairs))]
        question = f"Question: What is the special number for {key}?\nAnswer: The special number for {key} is"
        return needles, question, f" {value}"
    if task == "multi_value":
        key = _key(rng, keys)
        values = [_number(rng, 7) for _ in range(3)]
        needles = [f"One of the special numbers for {key} is {value}." for value in values]
        question = (
            f"Question: What are all the special numbers for {key}, in the order they appear?\n"
            f"Answer: The special numbers for {key} are"
        )
        return needles, question, " " + ", ".join(values)
    if task == "variable_tracking":
        chain = [_key(rng, keys).replace("-", "_") for _ in range(3)]
        value = _number(rng, 5)
        needles = [f"VAR {chain[0]} = {value}."]
        needles += [f"VAR {later} = VAR {earlier}." for earlier, later in zip(chain, chain[1:])]
        question = (
            f"Question: Which variables hold the value {value}, in the order they were assigned?\n"
            f"Answer: The variables that hold the value {value} are: VAR"
        )
        return needles, question, " " + ", VAR ".join(chain)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def make_sample(
    task: str,
    length: int,
    seed: int,
    paragraphs: list[str],
    count_tokens: Callable[[str], int],
) -> RetrievalSample:
    """A prompt of about `length` tokens (by `count_tokens`) for `task`, fully determined by `seed`.

    Haystack paragraphs are taken in order from a seeded starting point (wrapping around) until
    the token budget is met; the needles go between paragraphs at seeded, increasing depths in
    (0.05, 0.95) of the haystack.
    """
    rng = random.Random(f"{task}:{seed}:{length}")
    needles, question, answer = _task_content(task, rng)
    fixed = count_tokens(INTRO + "\n\n".join(needles) + "\n\n" + question + answer)
    budget = length - fixed
    if budget <= 0:
        raise ValueError(f"length {length} is too short for the {task} prompt ({fixed} tokens)")

    haystack: list[str] = []
    used = 0
    start = rng.randrange(len(paragraphs))
    while used < budget:
        paragraph = paragraphs[(start + len(haystack)) % len(paragraphs)]
        cost = count_tokens(paragraph + "\n\n")
        if used + cost > budget and haystack:
            break
        haystack.append(paragraph)
        used += cost

    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    slots = [round(depth * len(haystack)) for depth in depths]
    body = list(haystack)
    for offset, (slot, needle) in enumerate(zip(slots, needles)):
        body.insert(slot + offset, needle)  # each earlier insertion shifts later slots by one
    prompt = INTRO + "\n\n".join(body) + "\n\n" + question
    return RetrievalSample(
        task=task,
        seed=seed,
        prompt=prompt,
        answer=answer,
        needles=needles,
        depths=[round(d, 3) for d in depths],
    )
