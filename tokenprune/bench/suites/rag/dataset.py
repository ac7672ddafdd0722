"""A synthetic RAG set generated from templates (no download; stdlib only so that other
environments, such as the LLMLingua venv, can import it).

Each example is a question about one attribute of one fictional entity, with ``n_passages``
retrieved passages (dicts ``{"title", "text"}``, the chat-template ``documents=`` convention):

* the gold passage: the entity's encyclopedic passage, which contains the gold answer sentence
  among other facts about the *same* entity (hard distractors: same subject, other relation) and
  background sentences;
* one or two "same relation, other entity" passages: another entity of the same kind whose
  passage states the same attribute (e.g. another company's founding year);
* unrelated passages about entities of other kinds.

Sentence order, paraphrases (several templates per fact and per question, some sentences refer to
the entity as "The company" / "She" rather than by name) and entity names are drawn from a seeded
RNG; the dev and test splits use different seeds, so they share templates but not entities.
Fictional names make the answer impossible to know without the passage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Example", "make_split"]

_SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "sil", "dan", "bre", "qu", "zel", "mon", "ar", "is", "pel",
              "gor", "tha", "nix", "ob", "ru", "sa", "vel", "dor", "fin", "ga", "hul", "jas", "kre", "lum", "ny"]
_CITIES = ["Oslo", "Lima", "Perth", "Quito", "Turin", "Leeds", "Osaka", "Tampere", "Cork", "Graz", "Porto",
           "Dakar", "Hobart", "Bergen", "Lyon", "Kyoto", "Austin", "Basel", "Accra", "Krakow"]
_FIRST = ["Maria", "John", "Aiko", "Pedro", "Lena", "Omar", "Greta", "Ivan", "Nadia", "Tom", "Sofia", "Raj",
          "Elena", "Kwame", "Hugo", "Mei", "Lars", "Amara", "Felix", "Zoe"]
_LAST = ["Okafor", "Lindqvist", "Tanaka", "Moreau", "Silva", "Novak", "Brennan", "Haddad", "Kowalski", "Reyes"]


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


# kind -> (noun phrase used as a pronoun, {attribute: (value maker, [statement templates], [question templates])})
_KINDS = {
    "company": ("The company", {
        "founded": (lambda r: str(r.randint(1850, 2015)),
                    ["{e} was founded in {v}.", "{p} was established in {v}.", "{e} traces its origins to {v}, when it was founded."],
                    ["When was {e} founded?", "In what year was {e} established?"]),
        "hq": (lambda r: r.choice(_CITIES),
               ["{e} is headquartered in {v}.", "{p} has its head office in {v}.", "The headquarters of {e} are located in {v}."],
               ["Where is {e} headquartered?", "In which city is the head office of {e}?"]),
        "ceo": (lambda r: _person(r),
                ["The chief executive of {e} is {v}.", "{p} is led by its CEO, {v}.", "{v} serves as the CEO of {e}."],
                ["Who is the CEO of {e}?", "Who runs {e} as chief executive?"]),
        "employees": (lambda r: f"{r.randint(2, 95)},{r.randint(100, 999)}",
                      ["{e} employs about {v} people.", "{p} has a workforce of roughly {v} employees."],
                      ["How many people does {e} employ?", "How large is the workforce of {e}?"]),
        "product": (lambda r: r.choice(["industrial pumps", "solar inverters", "bicycle frames", "medical sensors",
                                        "cloud storage", "ceramic tiles", "ship engines", "garden tools"]),
                    ["{e} is best known for its {v}.", "The main product line of {e} is {v}."],
                    ["What is {e} best known for making?", "What is the main product of {e}?"]),
    }),
    "person": ("She", {
        "born": (lambda r: f"{r.randint(1, 28)} {r.choice(['March', 'May', 'July', 'October', 'January'])} {r.randint(1920, 1995)}",
                 ["{e} was born on {v}.", "{p} was born on {v} in a small village."],
                 ["When was {e} born?", "What is the birth date of {e}?"]),
        "field": (lambda r: r.choice(["marine biology", "number theory", "medieval history", "glaciology",
                                      "organic chemistry", "linguistics", "astrophysics", "economics"]),
                  ["{e} is a researcher in {v}.", "{p} built a career in {v}.", "The main field of {e} is {v}."],
                  ["What field does {e} work in?", "In which discipline is {e} a researcher?"]),
        "award": (lambda r: f"the {_name(r)} Prize",
                  ["{e} received {v} for her work.", "In recognition of her research, {p} was awarded {v}."],
                  ["Which prize did {e} receive?", "What award was given to {e}?"]),
        "university": (lambda r: f"the University of {r.choice(_CITIES)}",
                       ["{e} studied at {v}.", "{p} earned her doctorate at {v}."],
                       ["Where did {e} study?", "At which university did {e} earn her doctorate?"]),
    }),
    "river": ("The river", {
        "length": (lambda r: f"{r.randint(40, 2900)} kilometres",
                   ["{e} is {v} long.", "{p} runs for {v} from source to mouth.", "The total length of {e} is {v}."],
                   ["How long is {e}?", "What is the length of {e}?"]),
        "mouth": (lambda r: f"the {_name(r)} Sea",
                  ["{e} flows into {v}.", "{p} empties into {v}.", "The mouth of {e} lies on {v}."],
                  ["Into which sea does {e} flow?", "Where does {e} empty?"]),
        "source": (lambda r: f"the {_name(r)} Mountains",
                   ["{e} rises in {v}.", "The source of {e} is in {v}."],
                   ["Where does {e} rise?", "Where is the source of {e}?"]),
        "fish": (lambda r: r.choice(["trout", "salmon", "perch", "catfish", "sturgeon", "pike"]),
                 ["{e} is famous for its {v}.", "Anglers visit {e} for its {v}."],
                 ["Which fish is {e} famous for?", "What do anglers catch in {e}?"]),
    }),
}

_FILLER = {
    "company": ["Like many firms in its sector, it faced strong competition during the 1990s.",
                "Industry analysts describe the market as mature but stable.",
                "Several smaller rivals were acquired by larger groups over the last decade.",
                "Its annual report is published every spring.",
                "The sector has been shaped by changing regulation, e.g. new safety rules in the U.S. and Europe."],
    "person": ["Her early work was published in several regional journals.",
               "Colleagues describe her as a patient and generous mentor.",
               "She has supervised many doctoral students over the years.",
               "She also writes essays for a general audience."],
    "river": ["The surrounding valley is used mostly for farming.",
              "Several old stone bridges cross it near the towns along its banks.",
              "Flooding was common before the dams were built in the 20th century.",
              "Its water quality has improved since the 1980s."],
}


@dataclass
class Example:
    """One question; ``candidates``: the distinct values of the asked attribute stated in its passages
    (the answer and those of the same-kind distractor entities)."""

    qid: str
    question: str
    answer: str
    gold_sentence: str
    gold_passage: int
    passages: list[dict]
    kind: str = ""
    attribute: str = ""
    candidates: list[str] = field(default_factory=list)


def _passage(rng: random.Random, kind: str, entity: str, facts: dict[str, str], force: str | None) -> tuple[dict, str | None]:
    pronoun, attrs = _KINDS[kind]
    sentences, gold = [], None
    for attr, value in facts.items():
        templates = attrs[attr][1]
        # The first sentence names the entity; later ones may use the pronoun ("The company ...").
        s = rng.choice(templates).format(e=entity, p=entity if rng.random() < 0.5 else pronoun, v=value)
        sentences.append(s)
        if attr == force:
            gold = s
    sentences += rng.sample(_FILLER[kind], k=rng.randint(2, len(_FILLER[kind])))
    rng.shuffle(sentences)
    lead = f"{entity} is a {kind if kind != 'person' else 'scientist'} described in this article."
    return {"title": entity, "text": " ".join([lead] + sentences)}, gold


def _entity(rng: random.Random, kind: str) -> tuple[str, dict[str, str]]:
    name = _person(rng) if kind == "person" else _name(rng) + (" River" if kind == "river" else " Industries")
    if kind == "person":
        name = f"{rng.choice(_FIRST)} {_name(rng)}"
    attrs = _KINDS[kind][1]
    return name, {a: attrs[a][0](rng) for a in attrs}


def make_split(seed: int, n_questions: int = 200, n_passages: int = 5) -> list[Example]:
    """``n_questions`` examples with ``n_passages`` passages each (the gold one at a random place)."""
    rng = random.Random(seed)
    kinds = list(_KINDS)
    out = []
    for qi in range(n_questions):
        kind = kinds[qi % len(kinds)]
        entity, facts = _entity(rng, kind)
        attr = rng.choice(list(facts))
        passages = []
        gold_passage, gold = _passage(rng, kind, entity, facts, attr)
        passages.append(gold_passage)
        candidates = [facts[attr]]
        # Same relation, other entity: the hardest distractors.
        for _ in range(rng.randint(1, 2)):
            other, other_facts = _entity(rng, kind)
            passages.append(_passage(rng, kind, other, other_facts, None)[0])
            candidates += [other_facts[attr]] * (other_facts[attr] not in candidates)
        while len(passages) < n_passages:
            k = rng.choice([k for k in kinds if k != kind])
            other, other_facts = _entity(rng, k)
            passages.append(_passage(rng, k, other, other_facts, None)[0])
        order = list(range(len(passages)))
        rng.shuffle(order)
        passages = [passages[i] for i in order]
        question = rng.choice(_KINDS[kind][1][attr][2]).format(e=entity)
        out.append(Example(f"{seed}-{qi}", question, facts[attr], gold, order.index(0), passages, kind, attr, candidates))
    return out
