"""The real generator's RAG prompt and answer scoring, shared by the answer study
(:mod:`~tokenprune.bench.suites.rag.qa`) and the ``tokenprune-bench --mode rag`` runner
(:mod:`~tokenprune.bench.suites.rag.run`).

Prompt: SmolLM2's ChatML with the documents rendered into the last user message (``# title`` +
text, then ``Question: ...``), a system instruction and one worked example; see the study's
docstring for how the format was chosen. Scoring: greedy decoding, the first line of the output,
correct when every word of the gold answer and no other candidate value occurs in it
(:func:`is_correct`).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["GENERATOR", "CHATML_DOC_TEMPLATE", "SYSTEM", "WORKED_EXAMPLE", "ANSWER_TOKENS", "FORMAT_TUNING_QUESTIONS",
           "messages_for", "answer_words", "names", "is_correct", "render", "generate_answer", "Accuracy", "accuracy",
           "paired_difference"]

#: the real generator of this study (a key of tokenprune.real_weights.REAL_MODELS)
GENERATOR = "smollm2-135m"
ANSWER_TOKENS = 24
#: test-split questions 0-39 were used to choose the prompt format; accuracy is measured on the rest
FORMAT_TUNING_QUESTIONS = 40

#: ChatML (SmolLM2's format) with documents: a user message's own ``documents`` (the worked example)
#: or, for the last user message, the ``documents=`` of ``apply_chat_template``.
CHATML_DOC_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if message['documents'] is defined %}{% set docs = message['documents'] %}"
    "{% elif loop.last and documents %}{% set docs = documents %}"
    "{% else %}{% set docs = [] %}{% endif %}"
    "{{ '<|im_start|>user\\n' }}"
    "{% for doc in docs %}{{ '# ' ~ doc['title'] ~ '\\n' ~ doc['text'] ~ '\\n\\n' }}{% endfor %}"
    "{{ 'Question: ' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = ("Answer the question using only the documents. "
          "Reply with the answer only: a few words copied from the right document.")
WORKED_EXAMPLE = [
    {"role": "user", "content": "Where is the head office of Zorvik Labs?", "documents": [
        {"title": "Zorvik Labs", "text": "Zorvik Labs was founded in 1931. Its head office is in Graz."},
        {"title": "Kelda Works", "text": "Kelda Works has its head office in Porto."}]},
    {"role": "assistant", "content": "Graz"},
]


def messages_for(question: str) -> list[dict[str, Any]]:
    """The conversation for one question: instruction, the worked example, the question last."""
    return [{"role": "system", "content": SYSTEM}, *WORKED_EXAMPLE, {"role": "user", "content": question}]


_FUNCTION_WORDS = frozenset({"the", "a", "an", "of", "in", "at"})


def answer_words(text: str) -> list[str]:
    """Lower-cased words without punctuation, articles, "of"/"in"/"at" or digit grouping ("14,570" -> "14570")."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
    return [w for w in re.sub(r"[^a-z0-9]+", " ", text).split() if w not in _FUNCTION_WORDS]


def names(output: str, value: str) -> bool:
    """Every word of ``value`` occurs in the first line of ``output``."""
    first = output.strip().split("\n", 1)[0] if output.strip() else ""
    return bool(answer_words(value)) and set(answer_words(value)) <= set(answer_words(first))


def is_correct(output: str, answer: str, others: Sequence[str] = ()) -> bool:
    """``output`` names ``answer`` and none of the ``others`` (the other candidate values: an output
    hedging between two values, "Graz or Porto", is wrong). An other value whose words are all words
    of the answer cannot be told apart from it and is ignored."""
    if not names(output, answer):
        return False
    own = set(answer_words(answer))
    return not any(names(output, v) for v in others if not set(answer_words(v)) <= own)


def render(tokenizer: Any, messages: list[dict], documents: Sequence[dict], pruner: Any = None) -> dict[str, torch.Tensor]:
    """Token ids of ``apply_chat_template(messages, documents=...)``, the documents pruned through
    ``tp.patch(tokenizer, pruner)`` when ``pruner`` is given."""
    import tokenprune as tp

    kwargs = dict(documents=list(documents), add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if pruner is None:
        return tokenizer.apply_chat_template(messages, **kwargs)
    with tp.patch(tokenizer, pruner):
        return tokenizer.apply_chat_template(messages, **kwargs)


@torch.inference_mode()
def generate_answer(model: Any, tokenizer: Any, ids: dict[str, torch.Tensor]) -> str:
    """Greedy answer (first line, special tokens dropped) to a rendered prompt."""
    out = model.generate(**ids, max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         stop_strings=["\n"], tokenizer=tokenizer)  # only the first line is scored
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text.split("\n", 1)[0] if text else ""


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int

    def __post_init__(self):
        if not 0 <= self.correct <= self.n or self.n < 1:
            raise ValueError(f"Accuracy needs 0 <= correct <= n and n >= 1, got correct={self.correct}, n={self.n}")

    @property
    def value(self) -> float:
        return self.correct / self.n

    @property
    def two_se(self) -> float:
        """Two binomial standard errors, 2 sqrt(p(1-p)/n) (0 when p is 0 or 1: see the counts)."""
        p = self.value
        return 2 * math.sqrt(p * (1 - p) / self.n)


def accuracy(hits: Sequence[bool]) -> Accuracy:
    if not hits:
        raise ValueError("accuracy of an empty sample")
    return Accuracy(sum(map(bool, hits)), len(hits))


def paired_difference(hits: Sequence[bool], reference: Sequence[bool]) -> tuple[float, float]:
    """Mean of ``hits - reference`` per question and two standard errors of that mean."""
    if len(hits) != len(reference) or not hits:
        raise ValueError(f"paired difference needs two non-empty samples of equal length, got {len(hits)} "
                         f"and {len(reference)}")
    d = [float(a) - float(b) for a, b in zip(hits, reference)]
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return mean, 2 * sd / math.sqrt(len(d))
