"""Synthetic visual question answering for the quality harness: shapes on a grid, closed answers.

A scene is a 336x336 RGB image (24x24 patches of 14 px, the LLaVA-1.5 geometry) divided into a
4x4 grid of 84-px cells. Three to seven shapes (circle, square, triangle, star) of six colours sit
in distinct cells with jittered size and position; every (colour, shape) pair appears at most once
per scene, so a phrase such as "the red circle" names one object. Clutter — small dots and thin
lines, drawn under the shapes and in the same colours — and a tinted, noisy background make the
model tell objects from distractors.

Each question needs one or a few regions of the image, which is what makes visual-token pruning
measurable (a method that drops the wrong patches loses the answer):

* ``color``    — "what color is the shape in cell b3 ?"                   (one cell; :func:`cell_name`)
* ``shape``    — "what shape is in cell b3 ?"                             (one cell)
* ``exist``    — "is there a red circle ?"                                (search; yes/no balanced)
* ``count``    — "how many red shapes are there ?" / "how many circles are there ?"   (every object)
* ``relation`` — "is the red circle left of the blue square ?" (or above)  (two objects; yes/no balanced)

Answers come from a fixed closed vocabulary :data:`ANSWERS` and are single tokens of the trained
tokenizer. Splits are seeded streams: sample ``i`` of split ``s`` with seed ``seed`` is always the
same scene and question (``random.Random`` seeded from the triple), so train and test never share
a generator state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
GRID = 4
CELL = IMAGE_SIZE // GRID  # 84 px = 6 patches of 14 px

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
MAX_COUNT = 5
COUNTS = tuple(str(n) for n in range(MAX_COUNT + 1))
ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *COUNTS, "yes", "no")
QUESTION_TYPES = ("color", "shape", "exist", "count", "relation")
SPLITS = {"train": 0, "val": 1, "test": 2}
# The LLaVA-1.5 prompt layout: image first, then the question. Pre-LLM pruning re-indexes the
# positions of everything after the image by the same amount, so the question and the answer stay
# adjacent, and FastV's last-token attention is the question's attention, as in the paper.
PROMPT = "USER: <image>\n{question} ASSISTANT:"


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    row: int  # 1-based grid row (top = 1)
    col: int  # 1-based grid column (left = 1)
    cx: float  # centre in pixels
    cy: float
    size: float  # bounding-box side in pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    seed: int  # seeds the clutter and noise of the rendering

    def render(self) -> Image.Image:
        return render_scene(self)


@dataclass(frozen=True)
class Sample:
    scene: Scene
    question: str
    answer: str
    qtype: str
    # The objects the answer depends on (indices into ``scene.objects``), one group per object role:
    # ``((i,),)`` for colour / shape / a present object, ``((a,), (b,))`` for a relation, every
    # counted object in one group for a count, ``()`` when nothing in the image is asked about.
    refs: tuple[tuple[int, ...], ...] = ()

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)


def _rng(split: str, seed: int, index: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return random.Random(f"tokenprune-quality/{split}/{seed}/{index}")


def make_scene(rng: random.Random) -> Scene:
    n = rng.randint(3, 7)
    cells = rng.sample(range(GRID * GRID), n)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    objects = []
    for cell, (color, shape) in zip(cells, kinds):
        row, col = divmod(cell, GRID)
        size = rng.uniform(30, 50)
        slack = (CELL - size) / 2 - 3
        cx = col * CELL + CELL / 2 + rng.uniform(-slack, slack)
        cy = row * CELL + CELL / 2 + rng.uniform(-slack, slack)
        objects.append(Obj(color, shape, row + 1, col + 1, cx, cy, size))
    base = rng.randint(200, 245)
    background = tuple(min(255, base + rng.randint(-12, 10)) for _ in range(3))
    return Scene(tuple(objects), background, rng.getrandbits(32))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` as a 336x336 RGB image (deterministic given the scene)."""
    rng = random.Random(scene.seed)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    palette = list(COLORS.values()) + [(90, 90, 90), (160, 160, 160)]
    # Background noise blobs, then clutter (dots and thin lines) in the object colours: distractors
    # smaller than any object so that counting and colour questions must ignore them.
    for _ in range(40):
        x, y = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
        shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in scene.background)
        r = rng.uniform(4, 14)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    for _ in range(rng.randint(6, 14)):
        x, y = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
        r = rng.uniform(1.5, 3.5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice(palette))
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(20, 70)
        draw.line((x0, y0, x0 + length * math.cos(angle), y0 + length * math.sin(angle)),
                  fill=rng.choice(palette), width=1)
    for o in scene.objects:
        _draw_object(draw, o, COLORS[o.color])
    return img


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    h = o.size / 2
    if o.shape == "circle":
        draw.ellipse((o.cx - h, o.cy - h, o.cx + h, o.cy + h), fill=fill)
    elif o.shape == "square":
        s = h * 0.85  # equal area-ish with the circle
        draw.rectangle((o.cx - s, o.cy - s, o.cx + s, o.cy + s), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(o.cx, o.cy - h), (o.cx - h, o.cy + h * 0.8), (o.cx + h, o.cy + h * 0.8)], fill=fill)
    else:
        draw.polygon(_star(o.cx, o.cy, h * 1.1), fill=fill)


def patch_objects(scene: Scene, patch: int = 14, min_cover: float = 0.2) -> np.ndarray:
    """Per-patch ground truth, raster order: index in ``scene.objects`` of the object covering at
    least ``min_cover`` of each patch (the most covering one), ``-1`` for background. ``[(336 / patch) ** 2]``."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        _draw_object(draw, o, i + 1)
    side = IMAGE_SIZE // patch
    m = np.asarray(mask).reshape(side, patch, side, patch).transpose(0, 2, 1, 3).reshape(side * side, -1)
    cover = np.stack([(m == i + 1).mean(axis=1) for i in range(len(scene.objects))], axis=1)
    return np.where(cover.max(axis=1) >= min_cover, cover.argmax(axis=1), -1)


def patch_labels(scene: Scene, patch: int = 14, min_cover: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch colour and shape class of the covering object (``0`` = background, else ``1 +
    index`` in :data:`COLORS` / :data:`SHAPES`), raster order; used as dense training targets."""
    objects = patch_objects(scene, patch, min_cover)
    colors = np.array([0] + [1 + list(COLORS).index(o.color) for o in scene.objects])
    shapes = np.array([0] + [1 + SHAPES.index(o.shape) for o in scene.objects])
    return colors[objects + 1], shapes[objects + 1]


def cell_name(o: Obj) -> str:
    """The grid cell as in chess: row letter ``a``-``d`` from the top, column digit ``1``-``4`` from
    the left (``b3`` = second row, third column). Row and column are then different kinds of token,
    so a question names its cell without the model having to tell two digits apart by order."""
    return f"{'abcd'[o.row - 1]}{o.col}"


def centre_patches(scene: Scene, patch: int = 14) -> np.ndarray:
    """Raster index of the patch holding each object's centre, ``[len(scene.objects)]``: a dense
    training target that lets patch features mark one token per object (what counting needs)."""
    side = IMAGE_SIZE // patch
    return np.array([int(o.cy // patch) * side + int(o.cx // patch) for o in scene.objects], dtype=np.int64)


def _ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str, tuple[tuple[int, ...], ...]]:
    """``(question, answer, refs)`` of type ``qtype`` about ``scene`` (``refs``: see :class:`Sample`)."""
    objs = scene.objects
    if qtype in ("color", "shape"):
        i = rng.randrange(len(objs))
        where = f"cell {cell_name(objs[i])}"
        if qtype == "color":
            return f"what color is the shape in {where} ?", objs[i].color, ((i,),)
        return f"what shape is in {where} ?", objs[i].shape, ((i,),)
    if qtype == "exist":
        present = {(o.color, o.shape): i for i, o in enumerate(objs)}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return f"is there a {color} {shape} ?", "yes", ((present[color, shape],),)
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        return f"is there a {color} {shape} ?", "no", ()
    if qtype == "count":
        if rng.random() < 0.5:
            color = rng.choice(list(COLORS))
            hits = tuple(i for i, o in enumerate(objs) if o.color == color)
            question = f"how many {color} shapes are there ?"
        else:
            shape = rng.choice(SHAPES)
            hits = tuple(i for i, o in enumerate(objs) if o.shape == shape)
            question = f"how many {PLURAL[shape]} are there ?"
        return question, str(len(hits)), (hits,) if hits else ()
    if qtype == "relation":
        # Pairs that differ along the asked axis; the answer is balanced by swapping the pair.
        axis = rng.choice(("left of", "above"))
        key = (lambda o: o.col) if axis == "left of" else (lambda o: o.row)
        pairs = [(a, b) for a in range(len(objs)) for b in range(len(objs)) if key(objs[a]) < key(objs[b])]
        if not pairs:
            axis = "above" if axis == "left of" else "left of"
            key = (lambda o: o.col) if axis == "left of" else (lambda o: o.row)
            pairs = [(a, b) for a in range(len(objs)) for b in range(len(objs)) if key(objs[a]) < key(objs[b])]
        a, b = rng.choice(pairs)
        answer = "yes"
        if rng.random() < 0.5:
            a, b, answer = b, a, "no"
        return (f"is the {objs[a].color} {objs[a].shape} {axis} the {objs[b].color} {objs[b].shape} ?",
                answer, ((a,), (b,)))
    raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")


def scene(split: str, index: int, seed: int = 0) -> Scene:
    """Scene ``index`` of ``split`` (the scene of :func:`sample` with the same arguments)."""
    return make_scene(_rng(split, seed, index))


def sample(split: str, index: int, seed: int = 0, questions: int = 1) -> list[Sample]:
    """Scene ``index`` of ``split`` and ``questions`` questions about it, types drawn uniformly.

    Several questions about one scene let training amortise the image over several answers
    (multi-turn; distinct questions when the scene allows); evaluation uses one question per scene.
    """
    rng = _rng(split, seed, index)
    return ask(make_scene(rng), rng, questions)


def ask(scene: Scene, rng: random.Random, questions: int = 1) -> list[Sample]:
    """``questions`` distinct questions (when the scene allows) about ``scene``, types drawn uniformly."""
    out: list[Sample] = []
    asked: set[str] = set()
    for _ in range(questions):
        # Distinct questions within a conversation, so later turns cannot copy an earlier answer.
        for _attempt in range(20):
            qtype = rng.choice(QUESTION_TYPES)
            question, answer, refs = _ask(scene, qtype, rng)
            if question not in asked:
                break
        asked.add(question)
        out.append(Sample(scene, question, answer, qtype, refs))
    return out


def dataset(split: str, n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` single-question samples of ``split`` (a fixed evaluation set)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [sample(split, i, seed)[0] for i in range(n)]


def iter_split(split: str, seed: int = 0, questions: int = 1, start: int = 0) -> Iterator[list[Sample]]:
    i = start
    while True:
        yield sample(split, i, seed, questions)
        i += 1


def corpus() -> list[str]:
    """Every word the prompts and answers can contain, in template sentences, to train the tokenizer."""
    rng = random.Random("tokenprune-quality/corpus")
    lines = []
    for i in range(400):
        for s in sample("train", i, seed=12345, questions=5):
            lines.append(f"{s.prompt} {s.answer}")
    lines += [f"USER: {a} ASSISTANT: {a}" for a in ANSWERS]
    rng.shuffle(lines)
    return lines


def majority_accuracy(samples: list[Sample]) -> float:
    """Accuracy of answering each question type with its most frequent training answer (a floor)."""
    by_type: dict[str, dict[str, int]] = {}
    for s in dataset("train", 4000, seed=999):
        counts = by_type.setdefault(s.qtype, {})
        counts[s.answer] = counts.get(s.answer, 0) + 1
    best = {t: max(c, key=c.get) for t, c in by_type.items()}
    return sum(best.get(s.qtype) == s.answer for s in samples) / max(1, len(samples))
