"""A varied RAG set for calibrating and checking context pruning on text it was not tuned on
(stdlib only, generated offline, like :mod:`~tokenprune.bench.suites.rag.dataset`).

Where :mod:`~tokenprune.bench.suites.rag.dataset` draws every question from one set of templates
and has exactly one relevant passage, this set varies what a threshold could overfit to:

* **ten domains** (template families: a company, a scientist, a river, a space probe, a novel; a
  village, a ship, a football club, a medicine, a band), each with its own attributes, several
  paraphrases per fact and per question (many share no content word with the question: "How many
  people work at X?" / "X has a staff of 4,200."), sentences that name the entity only through an
  anaphor ("The firm ...", "It ..."), and domain background sentences;
* **three question shapes**: one fact (one relevant passage), two facts about one entity stated in
  two different passages (its profile and a second article), and comparisons of two entities
  (two relevant passages, one per entity);
* **question styles** (bare question, prefixes, a request for a report, keyword queries);
* **distractors**: passages about other entities of the same domain stating the same attribute
  (the hardest), and passages from other domains; 4-7 passages per question, 5-11 sentences each.

Every fact is stated exactly once among a question's passages, so the answer sentences
(:attr:`HeldoutExample.gold`) are exactly the sentences a pruner must keep. Names and values are
fictional: a model cannot know the answer without the passages.

**Fixed split by template family**: ``"tune"`` uses the first five domains and two question
styles, ``"test"`` the other five domains and three other styles, so a threshold tuned on
``"tune"`` has seen none of the test split's passage templates, question paraphrases or styles.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["HeldoutExample", "FAMILIES", "SPLITS", "make_heldout", "gold_sentence_indices"]

_SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "sil", "dan", "bre", "qu", "zel", "mon", "ar", "is", "pel", "gor",
        "tha", "nix", "ob", "ru", "sa", "vel", "dor", "fin", "ga", "hul", "jas", "kre", "lum", "ny", "es", "vo"]
_FIRST = ["Maria", "Jonas", "Aiko", "Pedro", "Lena", "Omar", "Greta", "Ivan", "Nadia", "Tomas", "Sofia", "Ravi",
          "Elena", "Kwame", "Hugo", "Mei", "Lars", "Amara", "Felix", "Zoe", "Ines", "Bruno", "Yara", "Anton"]
_FIRST_F = ["Maria", "Aiko", "Lena", "Greta", "Nadia", "Sofia", "Elena", "Mei", "Amara", "Zoe", "Ines", "Yara"]


def _word(r: random.Random, parts: int = 2) -> str:
    return "".join(r.choice(_SYL) for _ in range(parts)).capitalize()


def _person(r: random.Random, first: list[str] = _FIRST) -> str:
    return f"{r.choice(first)} {_word(r, r.choice([2, 3]))}"


def _place(r: random.Random) -> str:
    return _word(r, r.choice([2, 3])) + r.choice(["", "burg", "ford", "holm", "ia", "stad"])


def _year(lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda r: str(r.randint(lo, hi))


def _count(lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda r: f"{r.randint(lo, hi):,}"


@dataclass(frozen=True)
class Attribute:
    """One fact of a domain: a value maker, statement paraphrases (``{e}`` the entity or an anaphor,
    ``{v}`` the value), question paraphrases, a keyword query and, for comparable values, comparison
    questions (``{a}``, ``{b}`` two entities)."""

    value: Callable[[random.Random], str]
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    keyword: str
    compare: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """One domain (template family): how its entities are named and described."""

    name: str
    name_maker: Callable[[random.Random], str]
    lead: tuple[str, ...]  # the passage's first sentence
    anaphors: tuple[str, ...]  # how later sentences may refer to the entity
    attributes: dict[str, Attribute]
    background: tuple[str, ...]  # sentences about the domain, not about the question's fact
    second_titles: tuple[str, ...]  # titles of a second article about the same entity


def _fam(name, name_maker, lead, anaphors, attributes, background, second_titles) -> Family:
    return Family(name, name_maker, tuple(lead), tuple(anaphors), attributes, tuple(background), tuple(second_titles))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # ------------------------------------------------------------------ tune families
    _fam("company", lambda r: f"{_word(r)} {r.choice(['Industries', 'Systems', 'Works', 'Holdings'])}",
         ["{e} is a manufacturing company.", "{e} is an industrial group with plants in several countries."],
         ["The company", "The firm", "It"],
         {"founded": Attribute(_year(1850, 2015),
                               ("{e} was founded in {v}.", "{e} traces its origins to {v}.",
                                "The first workshop of {e} opened its doors in {v}."),
                               ("When was {e} founded?", "In what year did {e} start?"),
                               "{e} founding year", ("Which is older, {a} or {b}?",)),
          "hq": Attribute(_place,
                          ("{e} is headquartered in {v}.", "{e} has its head office in {v}.",
                           "Most of the management of {e} works from offices in {v}."),
                          ("Where is {e} headquartered?", "In which city does {e} have its head office?"),
                          "{e} headquarters city"),
          "staff": Attribute(_count(200, 90000),
                             ("{e} employs about {v} people.", "{e} has a staff of {v}.",
                              "Roughly {v} workers are on the payroll of {e}."),
                             ("How many people work at {e}?", "How many employees does {e} have?"),
                             "{e} number of employees", ("Which employs more people, {a} or {b}?",)),
          "ceo": Attribute(_person,
                           ("{e} is run by chief executive {v}.", "{v} became the CEO of {e} after a board vote.",
                            "Day-to-day decisions at {e} are taken by {v}, its chief executive."),
                           ("Who is the CEO of {e}?", "Who leads {e} as chief executive?"), "{e} CEO")},
         ["Competition in the sector grew sharply during the 1990s.",
          "Analysts describe the market as mature but stable.",
          "Several smaller rivals were bought by larger groups over the last decade.",
          "Annual reports in this industry are usually published in spring.",
          "New safety rules changed how factories in the region are inspected.",
          "Trade fairs remain an important place to meet customers.",
          "Energy prices weigh heavily on the costs of such plants."],
         ["{e}: recent news", "{e} in the business press"]),
    _fam("scientist", lambda r: _person(r, _FIRST_F),  # the templates say "her"
         ["{e} is a research scientist.", "{e} is an academic known for work across several disciplines."],
         ["She", "The researcher", "The scientist"],
         {"born": Attribute(_year(1925, 1995),
                            ("{e} was born in {v}.", "{e} came into the world in {v}.",
                             "The birth of {e} was recorded in {v} in a small village."),
                            ("When was {e} born?", "In which year was {e} born?"),
                            "{e} birth year", ("Who was born first, {a} or {b}?",)),
          "field": Attribute(lambda r: r.choice(["marine biology", "number theory", "glaciology", "linguistics",
                                                 "organic chemistry", "astrophysics", "economics", "seismology"]),
                             ("{e} is a researcher in {v}.", "{e} built a career in {v}.",
                              "Most papers by {e} deal with {v}."),
                             ("What field does {e} work in?", "Which discipline does {e} study?"), "{e} research field"),
          "award": Attribute(lambda r: f"the {_word(r)} Prize",
                             ("{e} received {v} for her work.", "In recognition of her research, {e} was awarded {v}.",
                              "A committee honoured {e} with {v}."),
                             ("Which prize did {e} receive?", "What award was given to {e}?"), "{e} award"),
          "university": Attribute(lambda r: f"the University of {_place(r)}",
                                  ("{e} studied at {v}.", "{e} earned her doctorate at {v}.",
                                   "Her student years were spent at {v}."),
                                  ("Where did {e} study?", "At which university did {e} get her degree?"),
                                  "{e} university")},
         ["Her early work appeared in several regional journals.",
          "Colleagues describe her as a patient and generous mentor.",
          "She has supervised many doctoral students over the years.",
          "She also writes essays for a general audience.",
          "Her laboratory is known for its open seminars.",
          "Funding for this kind of research has varied a lot from decade to decade."],
         ["Interview with {e}", "{e}: a profile"]),
    _fam("river", lambda r: f"{_word(r)} River",
         ["{e} is a river in a sparsely populated region.", "{e} is one of the main rivers of its province."],
         ["The river", "It", "Its course"],
         {"length": Attribute(lambda r: f"{r.randint(40, 2900)} kilometres",
                              ("{e} is {v} long.", "{e} runs for {v} from source to mouth.",
                               "Measured from its spring, {e} covers {v}."),
                              ("How long is {e}?", "What is the length of {e}?"),
                              "{e} length", ("Which is longer, {a} or {b}?",)),
          "mouth": Attribute(lambda r: f"the {_word(r)} Sea",
                             ("{e} flows into {v}.", "{e} empties into {v}.", "The waters of {e} end in {v}."),
                             ("Into which sea does {e} flow?", "Where does {e} end?"), "{e} mouth"),
          "source": Attribute(lambda r: f"the {_word(r)} Mountains",
                              ("{e} rises in {v}.", "The source of {e} lies in {v}.",
                               "Snowmelt from {v} feeds the first stretch of {e}."),
                              ("Where does {e} rise?", "Where is the source of {e}?"), "{e} source"),
          "fish": Attribute(lambda r: r.choice(["trout", "salmon", "perch", "catfish", "sturgeon", "pike"]),
                            ("{e} is famous for its {v}.", "Anglers visit {e} for its {v}.",
                             "Local restaurants serve {v} caught in {e}."),
                            ("Which fish is {e} famous for?", "What do anglers catch in {e}?"), "{e} fish")},
         ["The surrounding valley is used mostly for farming.",
          "Several old stone bridges cross it near the towns along its banks.",
          "Flooding was common before the dams were built in the 20th century.",
          "Its water quality has improved since the 1980s.",
          "Boat traffic is limited to small leisure craft.",
          "Herons and kingfishers nest along the quieter stretches."],
         ["{e}: ecology survey", "Travelling along {e}"]),
    _fam("probe", lambda r: f"{_word(r)} {r.choice(['Probe', 'Explorer', 'Orbiter'])}",
         ["{e} is an uncrewed space probe.", "{e} is a robotic spacecraft built for deep-space research."],
         ["The probe", "The spacecraft", "It"],
         {"launched": Attribute(_year(1965, 2030),
                                ("{e} was launched in {v}.", "{e} lifted off in {v}.",
                                 "The rocket carrying {e} left the pad in {v}."),
                                ("When was {e} launched?", "In what year did {e} lift off?"),
                                "{e} launch year", ("Which was launched first, {a} or {b}?",)),
          "target": Attribute(lambda r: f"the moon {_word(r)}",
                              ("{e} was sent to study {v}.", "The destination of {e} is {v}.",
                               "{e} spent years mapping {v}."),
                              ("What did {e} go to study?", "Which body was {e} sent to?"), "{e} target"),
          "mass": Attribute(lambda r: f"{r.randint(90, 6000)} kilograms",
                            ("{e} weighs {v}.", "Fully fuelled, {e} has a mass of {v}.",
                             "Engineers kept {e} to {v} at launch."),
                            ("How heavy is {e}?", "What is the mass of {e}?"), "{e} mass",
                            ("Which is heavier, {a} or {b}?",)),
          "agency": Attribute(lambda r: f"the {_word(r)} Space Agency",
                              ("{e} was built by {v}.", "{e} is operated by {v}.",
                               "Mission control for {e} is run by {v}."),
                              ("Which agency built {e}?", "Who operates {e}?"), "{e} agency")},
         ["Deep-space missions usually take a decade from design to launch.",
          "Radio signals from the outer planets take hours to reach Earth.",
          "Most probes rely on solar panels or radioisotope generators for power.",
          "Launch windows to the outer planets open only every few years.",
          "Ground stations on three continents track such missions.",
          "Budgets for planetary science have been cut several times."],
         ["{e}: mission update", "{e} after ten years"]),
    _fam("novel", lambda r: f"The {_word(r)} {r.choice(['Letters', 'Garden', 'Crossing', 'Winter'])}",
         ["{e} is a novel.", "{e} is a work of fiction that has been translated into many languages."],
         ["The novel", "The book", "It"],
         {"author": Attribute(_person,
                              ("{e} was written by {v}.", "{v} is the author of {e}.",
                               "{v} spent six years drafting {e}."),
                              ("Who wrote {e}?", "Who is the author of {e}?"), "{e} author"),
          "published": Attribute(_year(1800, 2022),
                                 ("{e} was published in {v}.", "{e} first appeared in bookshops in {v}.",
                                  "The first edition of {e} was printed in {v}."),
                                 ("When was {e} published?", "In what year did {e} come out?"),
                                 "{e} publication year", ("Which came out first, {a} or {b}?",)),
          "setting": Attribute(_place,
                               ("{e} is set in {v}.", "The story of {e} takes place in {v}.",
                                "The characters of {e} live in the town of {v}."),
                               ("Where is {e} set?", "In which town does {e} take place?"), "{e} setting"),
          "pages": Attribute(lambda r: f"{r.randint(90, 1400)} pages",
                             ("{e} runs to {v}.", "The hardback edition of {e} has {v}."),
                             ("How many pages does {e} have?", "How long is the book {e}?"), "{e} page count",
                             ("Which book is longer, {a} or {b}?",))},
         ["Critics were divided when it first appeared.",
          "Reading groups often choose it for its short chapters.",
          "A stage adaptation toured several cities.",
          "The genre was very popular among young readers at the time.",
          "Second-hand copies of early editions are sought by collectors.",
          "Literary prizes in the period favoured historical fiction."],
         ["{e}: a review", "Rediscovering {e}"]),
    # ------------------------------------------------------------------ test families
    _fam("village", lambda r: _place(r),
         ["{e} is a village in a hilly district.", "{e} is a small rural settlement."],
         ["The village", "The settlement", "It"],
         {"population": Attribute(_count(80, 9000),
                                  ("{e} has {v} inhabitants.", "Around {v} residents live in {e}.",
                                   "At the last census, {e} counted {v} people."),
                                  ("What is the population of {e}?", "How many residents does {e} have?"),
                                  "{e} population", ("Which has more inhabitants, {a} or {b}?",)),
          "elevation": Attribute(lambda r: f"{r.randint(20, 2400)} metres",
                                 ("{e} lies at an altitude of {v}.", "{e} sits {v} above sea level.",
                                  "The church square of {e} is {v} higher than the coast."),
                                 ("How high is {e}?", "At what elevation is {e}?"), "{e} elevation",
                                 ("Which lies higher, {a} or {b}?",)),
          "mayor": Attribute(_person,
                             ("The mayor of {e} is {v}.", "{v} was elected to lead the council of {e}.",
                              "Local affairs in {e} are handled by {v}, the mayor."),
                             ("Who is the mayor of {e}?", "Who runs the council of {e}?"), "{e} mayor"),
          "festival": Attribute(lambda r: f"the {_word(r)} Fair",
                                ("{e} is known for {v}.", "Every autumn {e} hosts {v}.",
                                 "Visitors come to {e} each year for {v}."),
                                ("Which festival is {e} known for?", "What event does {e} host every year?"),
                                "{e} festival")},
         ["The nearest railway station is a short bus ride away.",
          "Many of its houses are built of local grey stone.",
          "Young people often move to the larger towns for work.",
          "Sheep farming was once the main source of income in the area.",
          "A weekly market is held in the square.",
          "Hiking trails in the district are marked in red and white."],
         ["{e}: local news", "Visiting {e}"]),
    _fam("ship", lambda r: f"the {r.choice(['MS', 'SS', 'RV'])} {_word(r)}",
         ["{e} is a merchant vessel.", "{e} is a seagoing ship with a long service record."],
         ["The ship", "The vessel", "She"],
         {"built": Attribute(_year(1890, 2020),
                             ("{e} was completed in {v}.", "{e} slid down the slipway in {v}.",
                              "Shipwrights finished {e} in {v}."),
                             ("When was {e} built?", "In which year was {e} completed?"),
                             "{e} build year", ("Which ship is older, {a} or {b}?",)),
          "port": Attribute(_place,
                            ("{e} is registered in {v}.", "The home port of {e} is {v}.",
                             "{e} flies the flag of the port of {v}."),
                            ("Where is {e} registered?", "What is the home port of {e}?"), "{e} home port"),
          "tonnage": Attribute(lambda r: f"{r.randint(800, 90000):,} tonnes",
                               ("{e} displaces {v}.", "The tonnage of {e} is {v}.",
                                "Fully loaded, {e} carries {v}."),
                               ("How large is {e}?", "What is the tonnage of {e}?"), "{e} tonnage",
                               ("Which ship is bigger, {a} or {b}?",)),
          "captain": Attribute(_person,
                               ("{e} is commanded by {v}.", "{v} is the captain of {e}.",
                                "The bridge of {e} answers to {v}."),
                               ("Who is the captain of {e}?", "Who commands {e}?"), "{e} captain")},
         ["Shipping rates rose steeply during the last decade.",
          "Crews on such ships usually serve rotations of several months.",
          "Older vessels were refitted to meet new emission rules.",
          "Storms in the northern routes delay many crossings in winter.",
          "Port fees make up a large share of running costs.",
          "Most cargo on these routes is carried in containers."],
         ["{e}: voyage log", "{e} in the maritime press"]),
    _fam("club", lambda r: f"{_word(r)} {r.choice(['FC', 'United', 'Athletic'])}",
         ["{e} is a football club.", "{e} is a professional football team playing in the second division."],
         ["The club", "The team", "It"],
         {"stadium": Attribute(lambda r: f"the {_word(r)} Arena",
                               ("{e} plays its home games at {v}.", "The home ground of {e} is {v}.",
                                "Supporters of {e} gather every other weekend at {v}."),
                               ("Where does {e} play its home matches?", "What is the stadium of {e}?"),
                               "{e} stadium"),
          "coach": Attribute(_person,
                             ("{e} is coached by {v}.", "{v} is the head coach of {e}.",
                              "Training at {e} is led by {v}."),
                             ("Who coaches {e}?", "Who is the manager of {e}?"), "{e} coach"),
          "titles": Attribute(lambda r: str(r.randint(0, 40)),
                              ("{e} has won the league {v} times.", "{e} holds {v} league titles.",
                               "The trophy cabinet of {e} contains {v} championship cups."),
                              ("How many titles has {e} won?", "How many league championships does {e} have?"),
                              "{e} league titles", ("Which club has more titles, {a} or {b}?",)),
          "founded": Attribute(_year(1870, 2010),
                               ("{e} was formed in {v}.", "{e} played its first match in {v}.",
                                "Workers from a local mill set up {e} in {v}."),
                               ("When was {e} established?", "How old is {e}?"), "{e} year formed",
                               ("Which club is older, {a} or {b}?",))},
         ["Ticket prices have risen steadily in recent seasons.",
          "Television money now makes up most of the league's income.",
          "Youth academies supply many of the league's players.",
          "Matches between neighbouring towns draw the largest crowds.",
          "Several clubs in the division share their grounds.",
          "The transfer window closes at the end of summer."],
         ["{e}: season preview", "{e} after the derby"]),
    _fam("medicine", lambda r: _word(r, 3).lower() + r.choice(["mab", "stat", "cillin", "zole"]),
         ["{e} is a prescription medicine.", "{e} is a drug approved for hospital use."],
         ["The drug", "The medicine", "It"],
         {"treats": Attribute(lambda r: r.choice(["migraine", "asthma", "gout", "psoriasis", "anaemia",
                                                  "insomnia", "arthritis", "hepatitis"]),
                              ("{e} is used to treat {v}.", "Doctors prescribe {e} for {v}.",
                               "{e} relieves the symptoms of {v}."),
                              ("What condition does {e} treat?", "What is {e} prescribed for?"), "{e} indication"),
          "approved": Attribute(_year(1950, 2024),
                                ("{e} was approved in {v}.", "Regulators cleared {e} for sale in {v}.",
                                 "{e} reached pharmacies in {v}."),
                                ("When was {e} approved?", "Since when has {e} been on the market?"),
                                "{e} approval year", ("Which drug was approved earlier, {a} or {b}?",)),
          "dose": Attribute(lambda r: f"{r.choice([5, 10, 20, 25, 50, 100, 250, 500])} milligrams",
                            ("The usual dose of {e} is {v}.", "Patients take {v} of {e} per day.",
                             "A standard tablet of {e} contains {v}."),
                            ("What is the dose of {e}?", "How much {e} does a patient take?"), "{e} dose"),
          "maker": Attribute(lambda r: f"{_word(r)} Pharma",
                             ("{e} is made by {v}.", "{v} manufactures {e}.",
                              "The patent on {e} is held by {v}."),
                             ("Who makes {e}?", "Which company produces {e}?"), "{e} manufacturer")},
         ["Side effects are usually mild and pass within days.",
          "Generic versions often appear once patents expire.",
          "Clinical trials for such drugs take several years.",
          "Pharmacists advise patients to read the leaflet carefully.",
          "Health insurers negotiate prices with manufacturers each year.",
          "Storage at room temperature is recommended."],
         ["{e}: prescribing notes", "{e} in clinical practice"]),
    _fam("band", lambda r: f"The {_word(r)}s",
         ["{e} is a rock band.", "{e} is a music group that has toured widely."],
         ["The band", "The group"],
         {"formed": Attribute(_year(1955, 2020),
                              ("{e} formed in {v}.", "{e} got together in {v}.",
                               "The members of {e} first rehearsed in a garage in {v}."),
                              ("When did {e} form?", "In which year was {e} started?"), "{e} formation year",
                              ("Which band formed earlier, {a} or {b}?",)),
          "singer": Attribute(_person,
                              ("The lead singer of {e} is {v}.", "{v} fronts {e}.",
                               "Vocals in {e} are by {v}."),
                              ("Who sings in {e}?", "Who is the frontman of {e}?"), "{e} singer"),
          "album": Attribute(lambda r: f"{_word(r)} Nights",
                             ("The best-known album of {e} is {v}.", "{e} broke through with the record {v}.",
                              "{v} sold more copies than any other record by {e}."),
                             ("What is the most famous album of {e}?", "Which record made {e} famous?"),
                             "{e} best album"),
          "hometown": Attribute(_place,
                                ("{e} comes from {v}.", "{e} started out in the clubs of {v}.",
                                 "All members of {e} grew up in {v}."),
                                ("Where is {e} from?", "What is the hometown of {e}?"), "{e} hometown")},
         ["Streaming has changed how such bands earn money.",
          "Summer festivals are their busiest season.",
          "Vinyl reissues of older albums sell well again.",
          "Music magazines rarely covered the local scene at first.",
          "Tours abroad are expensive for independent groups.",
          "Many bands of that era recorded in the same small studio."],
         ["{e}: tour diary", "{e} live review"]),
)}

_STYLES = {
    "bare": "{q}",
    "quick": "Quick question: {q}",
    "report": "I am writing a short report about {e}. {q}",
    "keyword": "{kw}",
    "documents": "{q} Please answer from the documents.",
}

#: split -> (template families, question styles)
SPLITS = {
    "tune": (("company", "scientist", "river", "probe", "novel"), ("bare", "quick")),
    "test": (("village", "ship", "club", "medicine", "band"), ("report", "keyword", "documents")),
}


@dataclass
class HeldoutExample:
    """One question and its passages (``{"title", "text"}`` dicts).

    ``gold`` lists ``(passage index, answer sentence)`` for every fact the question needs (each stated
    exactly once); ``answers`` the answer strings (a comparison: the entity the question asks for,
    or both values for a keyword query); ``relevant`` the passages holding a gold sentence.
    """

    qid: str
    family: str
    shape: str  # "single", "two-facts" or "compare"
    style: str
    question: str
    answers: list[str]
    gold: list[tuple[int, str]]
    passages: list[dict]
    relevant: list[int] = field(default_factory=list)


def _capital(s: str) -> str:
    return s[0].upper() + s[1:]


def _state(r: random.Random, fam: Family, attr: Attribute, entity: str, value: str, anaphor_ok: bool) -> str:
    """One statement of a fact; after the lead sentence it may name the entity by an anaphor."""
    template = r.choice(attr.statements)
    # Anaphors only as the subject ("It was founded ..."), where every one of them reads correctly.
    anaphor = anaphor_ok and template.startswith("{e}") and r.random() < 0.35
    return _capital(template.format(e=r.choice(fam.anaphors) if anaphor else entity, v=value))


def _profile(r: random.Random, fam: Family, entity: str, facts: dict[str, str], omit: set[str], gold: set[str]):
    """The entity's article: lead sentence, its facts (minus ``omit``) and background, shuffled.
    Returns the passage and ``{attribute: sentence}`` for the attributes in ``gold``."""
    stated, body = {}, []
    for name, value in facts.items():
        if name in omit:
            continue
        s = _state(r, fam, fam.attributes[name], entity, value, anaphor_ok=True)
        body.append(s)
        stated[name] = s
    body += r.sample(fam.background, k=r.randint(2, 5))
    r.shuffle(body)
    lead = _capital(r.choice(fam.lead).format(e=entity))
    return {"title": _capital(entity), "text": " ".join([lead] + body)}, {k: v for k, v in stated.items() if k in gold}


def _second(r: random.Random, fam: Family, entity: str, attr: str, value: str):
    """A second article about the entity stating one more fact among background sentences."""
    s = _state(r, fam, fam.attributes[attr], entity, value, anaphor_ok=False)
    body = r.sample(fam.background, k=r.randint(3, 5)) + [s]
    r.shuffle(body)
    return {"title": _capital(r.choice(fam.second_titles).format(e=entity)), "text": " ".join(body)}, s


def _entity(r: random.Random, fam: Family) -> tuple[str, dict[str, str]]:
    return fam.name_maker(r), {k: a.value(r) for k, a in fam.attributes.items()}


#: words of a comparison question that ask for the smaller value ("Which is older": the earlier
#: year) or the larger one ("Which employs more people"); every template has exactly one of them.
_ASKS_SMALLER = ("older", "first", "earlier")
_ASKS_LARGER = ("more", "longer", "heavier", "higher", "bigger")


def _winner(template: str, a: str, b: str) -> int:
    """Which of two comparable values (the first number in each string) a comparison question
    ``template`` asks for: 0 for ``a``, 1 for ``b`` (a tie: ``a``)."""
    words = set(re.findall(r"[a-z]+", template.lower()))
    smaller, larger = words & set(_ASKS_SMALLER), words & set(_ASKS_LARGER)
    if bool(smaller) == bool(larger):
        raise ValueError(f"comparison template {template!r} names no direction (or both): "
                         f"use one of {_ASKS_SMALLER + _ASKS_LARGER}")
    x, y = (float(re.search(r"\d[\d,]*", s).group().replace(",", "")) for s in (a, b))
    return int(y < x) if smaller else int(y > x)


def make_heldout(split: str, n_questions: int = 200, seed: int = 0) -> list[HeldoutExample]:
    """``n_questions`` examples of ``split`` (``"tune"`` or ``"test"``, see the module docstring).

    Question shapes cycle single / two-facts / single / compare, families round-robin, styles at
    random among the split's; 4-7 passages per question, the relevant ones at random places.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(n_questions, bool) or not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be an int >= 1, got {n_questions!r}")
    families, styles = SPLITS[split]
    r = random.Random(f"{split}-{seed}")
    shapes = ["single", "two-facts", "single", "compare"]
    out = []
    for qi in range(n_questions):
        fam = FAMILIES[families[qi % len(families)]]
        shape = shapes[qi % len(shapes)]
        if shape == "compare" and not any(a.compare for a in fam.attributes.values()):
            shape = "single"
        style = r.choice(styles)
        entity, facts = _entity(r, fam)
        relevant: list[tuple[dict, list[tuple[str, str]]]] = []  # passage, [(attribute, gold sentence)]
        if shape == "single":
            attr = r.choice(list(facts))
            passage, gold = _profile(r, fam, entity, facts, set(), {attr})
            relevant.append((passage, [(attr, gold[attr])]))
            a = fam.attributes[attr]
            q = r.choice(a.questions).format(e=entity)
            question = a.keyword.format(e=entity) if style == "keyword" else _STYLES[style].format(q=q, e=entity)
            answers = [facts[attr]]
        elif shape == "two-facts":
            first, second = r.sample(list(facts), 2)
            passage, gold = _profile(r, fam, entity, facts, {second}, {first})
            relevant.append((passage, [(first, gold[first])]))
            news, s = _second(r, fam, entity, second, facts[second])
            relevant.append((news, [(second, s)]))
            a1, a2 = fam.attributes[first], fam.attributes[second]
            if style == "keyword":
                question = f"{a1.keyword.format(e=entity)}, {a2.keyword.format(e=entity)}"
            else:
                q = f"{r.choice(a1.questions).format(e=entity)} {r.choice(a2.questions).format(e=entity)}"
                question = _STYLES[style].format(q=q, e=entity)
            answers = [facts[first], facts[second]]
        else:
            attr = r.choice([k for k, a in fam.attributes.items() if a.compare])
            other, other_facts = _entity(r, fam)
            for ent, f in ((entity, facts), (other, other_facts)):
                passage, gold = _profile(r, fam, ent, f, set(), {attr})
                relevant.append((passage, [(attr, gold[attr])]))
            a = fam.attributes[attr]
            template = r.choice(a.compare)
            if style == "keyword":  # no direction asked: both values
                question = f"{a.keyword.format(e=entity)} vs {a.keyword.format(e=other)}"
                answers = [facts[attr], other_facts[attr]]
            else:
                question = _STYLES[style].format(q=template.format(a=entity, b=other), e=entity)
                answers = [(entity, other)[_winner(template, facts[attr], other_facts[attr])]]
        n_passages = r.randint(4, 7)
        distractors = []
        # Same domain, other entities: they state the asked attribute too (the hardest distractors).
        for _ in range(r.randint(1, 2)):
            ent, f = _entity(r, fam)
            distractors.append(_profile(r, fam, ent, f, set(), set())[0])
        while len(relevant) + len(distractors) < n_passages:
            other_fam = FAMILIES[r.choice([f for f in families if f != fam.name])]
            ent, f = _entity(r, other_fam)
            distractors.append(_profile(r, other_fam, ent, f, set(), set())[0])
        passages = [p for p, _ in relevant] + distractors
        order = list(range(len(passages)))
        r.shuffle(order)
        where = {old: new for new, old in enumerate(order)}
        gold_list = [(where[i], s) for i, (_, golds) in enumerate(relevant) for _, s in golds]
        out.append(HeldoutExample(
            qid=f"{split}-{seed}-{qi}", family=fam.name, shape=shape, style=style, question=question,
            answers=answers, gold=sorted(gold_list), passages=[passages[i] for i in order],
            relevant=sorted({i for i, _ in gold_list})))
    return out


def gold_sentence_indices(example: HeldoutExample, sentences: list[list[str]]) -> list[tuple[int, int]]:
    """``(passage, sentence index)`` of every gold sentence, given each passage's segmented sentences.

    Raises:
        ValueError: a gold sentence is not one whole segment (the segmenter split or merged it).
    """
    out = []
    for p, gold in example.gold:
        stripped = [s.strip() for s in sentences[p]]
        if gold not in stripped:
            raise ValueError(f"{example.qid}: gold sentence {gold!r} is not a segment of passage {p}")
        out.append((p, stripped.index(gold)))
    return out
