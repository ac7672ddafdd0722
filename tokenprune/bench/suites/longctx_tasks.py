"""Synthetic long-context tasks, generated offline and deterministically: needle, key-value, two-hop QA.

Every sample is a chat prompt (the tokenizer's template) whose user turn holds a long context and a
question, followed by the start of the assistant's answer (an *answer prefix*, as in RULER, Hsieh
et al. 2024, arXiv 2404.06654), so a small instruct model answers with the value itself and the
answer is scored by exact match of the first number it writes:

* ``needle``: filler prose with one "special magic number for <city>" sentence at a random depth and
  three distractor sentences of the same form for other cities (RULER's multi-key needle);
* ``kv``: six "The code of the <adjective>-<noun> locker is <value>." records at random depths; the
  question asks for one key's value (key-value retrieval, after Liu et al. 2023, "Lost in the
  Middle"). A list made only of key-value lines (their format) is beyond SmolLM2-135M: 0/8 correct
  at 256 and 1024 tokens, so the records sit in prose like the needles;
* ``hop2``: "<person> lives in <town>." and "The postal code of <town> is <number>." at independent
  depths, plus one distractor pair; the question asks for the person's postal code. The answer
  prefix starts the chain ("<person> lives in"): the model must name the town, then find its code.

Formats were tuned until the unpruned SmolLM2-135M-Instruct solves them at 1k tokens (needle 3/4,
kv 6/6, hop2 4/8 in the tuning runs; hop2 with three people was 2/6, with an instruction on the
answer's form 0-1/6).

A sample's context is sized in tokens of the given tokenizer: filler is added sentence by sentence
until the prompt reaches ``length`` tokens (within a few tokens). Same ``seed`` -> same samples.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

__all__ = ["Sample", "KINDS", "make_samples", "score"]

KINDS = ("needle", "kv", "hop2")

_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal",
          "Lena", "Marco", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Soren", "Tomas", "Ulla", "Viktor",
          "Wanda", "Xavier", "Yara", "Zoltan")
_TOWNS = ("Ardmoor", "Belcrest", "Corvale", "Dunhollow", "Eastmere", "Fallowby", "Glenrock", "Harrowgate",
          "Ivybridge", "Juniper Falls", "Kestrel Bay", "Larkspur", "Millbrook", "Northwick", "Oakridge",
          "Pinecliff", "Queensferry", "Redwater", "Stonehaven", "Thornbury", "Upton Vale", "Westholm")
_CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hanoi", "Dakar", "Bergen", "Cusco", "Perth",
           "Tbilisi", "Valencia", "Accra", "Riga", "Montreal", "Seville", "Lima", "Kyoto", "Porto", "Zagreb")
_SUBJECTS = ("The old library", "A quiet river", "The morning train", "Our neighbour", "The village baker",
             "A tall lighthouse", "The school choir", "An old fisherman", "The city museum", "A small garden",
             "The night market", "A wooden bridge", "The mountain path", "The harbour crane", "A local farmer")
_VERBS = ("opens early on most days", "was painted blue last spring", "attracts visitors in the summer",
          "is mentioned in many stories", "needs repairs after every storm", "has stood there for a century",
          "smells of bread and coffee", "is quiet during the winter", "can be seen from the hill",
          "was rebuilt after the flood", "hosts a fair every autumn", "is busy on weekend mornings")
_CLAUSES = ("and people often stop to talk there", "although few remember why", "which surprises newcomers",
            "as the guidebooks say", "and the children love it", "even when the weather is poor",
            "according to the town records", "while the gulls circle overhead")


@dataclass(frozen=True)
class Sample:
    """One prompt: ``messages`` + ``answer_prefix`` (the assistant's first words), and the ``answer``."""

    kind: str
    length: int
    index: int
    context: str
    question: str
    answer_prefix: str
    answer: str

    def prompt_ids(self, tokenizer) -> list[int]:
        """Token ids of the chat prompt followed by the answer prefix."""
        messages = [{"role": "user", "content": f"{self.context}\n\n{self.question}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text + self.answer_prefix, add_special_tokens=False)["input_ids"]


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}, {rng.choice(_CLAUSES)}."


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


_ADJ = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly", "keen",
        "lunar", "mellow", "nimble", "olive", "proud", "quiet", "rusty", "silver", "tidy", "urban", "vivid",
        "woolly", "young", "zesty")
_NOUN = ("anchor", "badger", "candle", "dragon", "ember", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orchard", "pepper", "quarry", "rocket", "saddle", "tunnel",
         "violin", "walnut", "yogurt", "zipper")


def _build(kind: str, rng: random.Random) -> tuple[list[tuple[float, str]], str, str, str]:
    """(facts with their relative depths in the context, question, answer prefix, answer)."""
    if kind == "needle":
        cities = rng.sample(_CITIES, 4)
        values = [_number(rng) for _ in cities]
        facts = [(rng.uniform(0.05, 0.95), f"The special magic number for {c} is {v}.") for c, v in zip(cities, values)]
        question = f"What is the special magic number for {cities[0]} mentioned in the text above?"
        return facts, question, f"The special magic number for {cities[0]} is", values[0]
    if kind == "kv":
        keys = rng.sample([f"{a}-{b}" for a in _ADJ for b in _NOUN], 6)
        values = [_number(rng) for _ in keys]
        facts = [(rng.uniform(0.05, 0.95), f"The code of the {k} locker is {v}.") for k, v in zip(keys, values)]
        question = f"What is the code of the {keys[0]} locker?"
        return facts, question, f"The code of the {keys[0]} locker is", values[0]
    if kind == "hop2":
        people = rng.sample(_NAMES, 2)
        towns = rng.sample(_TOWNS, 2)
        codes = [_number(rng) for _ in towns]
        facts = []
        for person, town, code in zip(people, towns, codes):
            facts.append((rng.uniform(0.05, 0.95), f"{person} lives in {town}."))
            facts.append((rng.uniform(0.05, 0.95), f"The postal code of {town} is {code}."))
        question = f"What is the postal code of the town where {people[0]} lives?"
        return facts, question, f"{people[0]} lives in", codes[0]
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _prose_sample(kind: str, rng: random.Random, length: int, tokenizer, index: int) -> Sample:
    facts, question, prefix, answer = _build(kind, rng)
    filler: list[str] = []

    def render(n: int) -> Sample:
        sentences = filler[:n]
        for depth, fact in sorted(facts):
            sentences.insert(int(depth * len(sentences) + 0.5), fact)
        return Sample(kind, length, index, " ".join(sentences), question, prefix, answer)

    # Grow in steps of 32 sentences, then trim one at a time: few tokenizer calls per sample.
    while len(render(len(filler)).prompt_ids(tokenizer)) < length:
        filler.extend(_filler(rng) for _ in range(32))
    n = len(filler)
    while n > 0 and len(render(n).prompt_ids(tokenizer)) > length:
        n -= 1
    return render(n)


def make_samples(tokenizer, kind: str, length: int, n: int, seed: int = 0) -> list[Sample]:
    """``n`` samples of ``kind`` whose prompts are at most ``length`` tokens (within ~20 below it).

    Raises:
        ValueError: unknown ``kind``; ``length < 128`` or ``n < 1``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(length, int) or length < 128:
        raise ValueError(f"length must be an int >= 128, got {length!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}-{kind}-{length}-{i}")
        out.append(_prose_sample(kind, rng, length, tokenizer, i))
    return out


_NUMBER = re.compile(r"\d+")


def score(sample: Sample, generated: str) -> bool:
    """Exact match: the first number the model writes equals the expected one.

    (For ``hop2`` the answer names the town first, then its code: "Oslo. The postal code of Oslo is 12345".)
    """
    numbers = _NUMBER.findall(generated)
    return bool(numbers) and numbers[0] == sample.answer


def describe(samples: list[Sample], tokenizer) -> dict[str, Optional[int]]:
    lengths = [len(s.prompt_ids(tokenizer)) for s in samples]
    return {"n": len(samples), "min_tokens": min(lengths), "max_tokens": max(lengths)}
