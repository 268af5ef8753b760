"""A synthetic visual-QA suite: coloured shapes on a plain background.

Every image holds 1..max_objects non-overlapping shapes. Questions come in five types,
each with a one-word answer, so exact match is an unambiguous metric:

    colour    "What color is the circle?"                 -> red
    shape     "What shape is the blue object?"            -> square
    count     "How many shapes are there?"                -> two
    exist     "Is there a green triangle?"                -> yes / no (balanced)
    position  "Is the square on the left or the right?"   -> left / right

Each query also carries every object's pixel box and the box of the object the question
is about (``target_box``), so box-grounded methods (UV-CoT) can be scored by IoU.

Splits are deterministic per (split, seed): ``sft`` builds the embedded base model,
``train`` is the query pool the preference rounds draw fresh slices from, ``test`` is the
held-out evaluation set. The three use disjoint random streams.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

from PIL import Image, ImageDraw

from models.records import Query

COLOR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
}
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five"]
QUESTION_TYPES = ("colour", "shape", "count", "exist", "position")
# Each split is its own random stream. `validation` is for tuning defaults (eval.split=validation),
# so that `test` stays untouched by the choices it reports on.
SPLIT_OFFSETS = {"sft": 1, "train": 2, "test": 3, "validation": 4}
# The question about one object, by type: it names the object's shape (colour, position) or its
# colour (shape). Shared by the splits, the base's unanswerable questions and the tokenizer corpus.
ASK_ABOUT = {"colour": "What color is the {}?", "shape": "What shape is the {} object?",
             "position": "Is the {} on the left or the right?"}


@dataclass(frozen=True)
class ShapesSpec:
    """What the images and questions look like. Larger shapes and fewer colours make
    perception easier for a tiny vision tower."""

    image_size: int = 64
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    min_objects: int = 1
    max_objects: int = 3
    min_size: int = 16
    max_size: int = 26
    background: tuple[int, int, int] = (245, 245, 245)
    qtypes: tuple[str, ...] = QUESTION_TYPES
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        unknown = set(self.colors) - set(COLOR_RGB)
        if unknown:
            raise ValueError(f"unknown colours {sorted(unknown)}; choose from {sorted(COLOR_RGB)}")
        bad = set(self.shapes) - {"circle", "square", "triangle"}
        if bad:
            raise ValueError(f"unknown shapes {sorted(bad)}; choose from circle, square, triangle")
        bad_q = set(self.qtypes) - set(QUESTION_TYPES)
        if bad_q:
            raise ValueError(f"unknown question types {sorted(bad_q)}; choose from {QUESTION_TYPES}")
        if not 1 <= self.min_objects <= self.max_objects <= len(COUNT_WORDS) - 1:
            raise ValueError("need 1 <= min_objects <= max_objects <= 5")


def spec_from_config(cfg: dict) -> ShapesSpec:
    """A ShapesSpec from a plain config dict (lists become tuples); unknown keys fail clearly."""
    known = set(ShapesSpec.__dataclass_fields__)
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"unknown shapes suite keys {sorted(unknown)}; known: {sorted(known)}")
    return ShapesSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


@dataclass
class ShapesSource:
    """The suite as a query source for the flow (conf/data/shapes.yaml, conf/eval/shapes.yaml)."""

    suite: dict = field(default_factory=dict)

    def queries(self, split: str, start: int, stop: int, seed: int) -> list[Query]:
        # Queries come from one sequential random stream, so a slice needs its prefix drawn
        # too; drawing is cheap (~0.1 ms per query).
        return make_queries(split, stop, seed, spec_from_config(dict(self.suite)))[start:stop]

    def check(self, split: str) -> None:
        """Raise ValueError now if ``split`` or the suite keys are unknown: the CLI calls this
        before any stage (flows/checks.check_data), so a typo fails before the model is built."""
        split_seed(split, 0)
        spec_from_config(dict(self.suite))

    def answer_space(self) -> set[str]:
        # A refusal is a well-formed answer (a base whose SFT asked about absent objects gives it);
        # it is never right on the suite's splits. Not in answer_space(): that feeds the tokenizer.
        return answer_space(spec_from_config(dict(self.suite))) | {UNANSWERABLE}


def answer_space(spec: ShapesSpec) -> set[str]:
    """Every answer the suite can ask for; anything else is a malformed output."""
    counts = COUNT_WORDS[spec.min_objects : spec.max_objects + 1]
    return set(spec.colors) | set(spec.shapes) | set(counts) | {"yes", "no", "left", "right"}


def split_seed(split: str, seed: int) -> int:
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_OFFSETS)}")
    return seed * 1000 + SPLIT_OFFSETS[split]


def _place_objects(rng: random.Random, spec: ShapesSpec) -> list[dict]:
    """Sample non-overlapping objects (rejection sampling on boxes with a 2 px gap)."""
    n = rng.randint(spec.min_objects, spec.max_objects)
    objects: list[dict] = []
    for _ in range(200):
        if len(objects) == n:
            break
        size = rng.randint(spec.min_size, spec.max_size)
        x0 = rng.randint(1, spec.image_size - size - 1)
        y0 = rng.randint(1, spec.image_size - size - 1)
        box = [x0, y0, x0 + size, y0 + size]
        if any(_overlap(box, o["box"], gap=2) for o in objects):
            continue
        objects.append({"shape": rng.choice(spec.shapes), "color": rng.choice(spec.colors), "box": box})
    return objects


def _overlap(a: list[int], b: list[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def render(objects: list[dict], spec: ShapesSpec) -> Image.Image:
    image = Image.new("RGB", (spec.image_size, spec.image_size), spec.background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        fill = COLOR_RGB[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _unique(objects: list[dict], key: str) -> list[dict]:
    """Objects whose value of ``key`` appears once, so a question naming it is unambiguous."""
    values = [o[key] for o in objects]
    return [o for o in objects if values.count(o[key]) == 1]


def _ask(qtype: str, objects: list[dict], rng: random.Random, spec: ShapesSpec):
    """Return (question, answer, target_box) or None if this image cannot pose qtype."""
    if qtype == "colour":
        options = _unique(objects, "shape")
        if not options:
            return None
        o = rng.choice(options)
        return ASK_ABOUT["colour"].format(o["shape"]), o["color"], o["box"]
    if qtype == "shape":
        options = _unique(objects, "color")
        if not options:
            return None
        o = rng.choice(options)
        return ASK_ABOUT["shape"].format(o["color"]), o["shape"], o["box"]
    if qtype == "count":
        return "How many shapes are there?", COUNT_WORDS[len(objects)], []
    if qtype == "exist":
        present = {(o["color"], o["shape"]) for o in objects}
        if rng.random() < 0.5:
            o = rng.choice(objects)
            return f"Is there a {o['color']} {o['shape']}?", "yes", o["box"]
        absent = [(c, s) for c in spec.colors for s in spec.shapes if (c, s) not in present]
        color, shape = rng.choice(absent)
        return f"Is there a {color} {shape}?", "no", []
    if qtype == "position":
        half = spec.image_size / 2
        # Objects near the vertical midline are ambiguous; do not ask about them.
        options = [o for o in _unique(objects, "shape") if abs((o["box"][0] + o["box"][2]) / 2 - half) >= 4]
        if not options:
            return None
        o = rng.choice(options)
        side = "left" if (o["box"][0] + o["box"][2]) / 2 < half else "right"
        return ASK_ABOUT["position"].format(o["shape"]), side, o["box"]
    raise ValueError(f"unknown question type {qtype!r}")


# The answer to a question about an object the image does not hold (VizWiz's convention, part of
# LLaVA-1.5's SFT mix). Only the base's SFT can ask such questions (model.tiny.sft_unanswerable_share);
# the suite's own splits never do, so on them "unanswerable" is a well-formed, wrong answer.
UNANSWERABLE = "unanswerable"
UNANSWERABLE_TYPES = ("colour", "shape", "position")


def _ask_unanswerable(qtype: str, objects: list[dict], rng: random.Random, spec: ShapesSpec):
    """(question, UNANSWERABLE, []) naming a shape (colour, position) or a colour (shape) that no
    object in the image has, or None if every option is present."""
    if qtype == "shape":
        absent = [c for c in spec.colors if c not in {o["color"] for o in objects}]
    else:
        absent = [s for s in spec.shapes if s not in {o["shape"] for o in objects}]
    return (ASK_ABOUT[qtype].format(rng.choice(absent)), UNANSWERABLE, []) if absent else None


def unanswerable_queries(split: str, n: int, seed: int, spec: ShapesSpec) -> list[Query]:
    """``n`` questions about absent objects (colour, shape and position in turn) on images drawn
    from their own random stream of ``split``. Deterministic."""
    rng = random.Random(f"unanswerable/{split_seed(split, seed)}")
    types = [t for t in UNANSWERABLE_TYPES if t in spec.qtypes]
    if not types:
        raise ValueError(f"unanswerable questions need one of the types {UNANSWERABLE_TYPES} in the suite")
    queries: list[Query] = []
    while len(queries) < n:
        qtype = types[len(queries) % len(types)]
        objects = _place_objects(rng, spec)
        asked = _ask_unanswerable(qtype, objects, rng, spec)
        if asked is None:
            continue
        question, answer, _ = asked
        queries.append(Query(
            id=f"shapes-{split}-unanswerable-{seed}-{len(queries)}", image=render(objects, spec), question=question,
            answer=answer, qtype=qtype, boxes=[[float(v) for v in o["box"]] for o in objects], target_box=[],
            source="shapes",
        ))
    return queries


def iter_queries(split: str, seed: int, spec: ShapesSpec | None = None) -> Iterator[Query]:
    """The split's endless query stream, question types cycling evenly. Deterministic."""
    spec = spec or ShapesSpec()
    rng = random.Random(split_seed(split, seed))
    made = 0
    while True:
        qtype = spec.qtypes[made % len(spec.qtypes)]
        objects = _place_objects(rng, spec)
        asked = _ask(qtype, objects, rng, spec)
        if asked is None:
            continue  # resample the image; keeps the question-type mix exact
        question, answer, target_box = asked
        yield Query(
            id=f"shapes-{split}-{seed}-{made}",
            image=render(objects, spec),
            question=question,
            answer=answer,
            qtype=qtype,
            boxes=[[float(v) for v in o["box"]] for o in objects],
            target_box=[float(v) for v in target_box],
            source="shapes",
        )
        made += 1


def make_queries(split: str, n: int, seed: int, spec: ShapesSpec | None = None) -> list[Query]:
    """``n`` queries of the given split, question types cycling evenly. Deterministic."""
    return list(islice(iter_queries(split, seed, spec), n))


def answer_options(qtype: str, spec: ShapesSpec) -> list[str]:
    """Every answer ``qtype`` can have under ``spec``."""
    return {"colour": list(spec.colors), "shape": list(spec.shapes),
            "count": COUNT_WORDS[spec.min_objects : spec.max_objects + 1],
            "exist": ["yes", "no"], "position": ["left", "right"]}[qtype]


def favoured_answer(qtype: str, spec: ShapesSpec) -> str:
    """The answer a skewed split over-represents for ``qtype`` (the first of its options)."""
    return answer_options(qtype, spec)[0]


def skewed_queries(split: str, n: int, seed: int, spec: ShapesSpec, favoured_share: float) -> list[Query]:
    """``n`` queries of ``split`` in which, for every question type, ``favoured_answer`` makes up
    ``favoured_share`` of the answers and the other answers share the rest in their natural
    proportions. Used to give the embedded base model a skewed answer prior (SFT on unbalanced
    answers, evaluated on the balanced test split), a bias that preference rounds can remove.

    Filters the split's stream with a quota per (type, favoured or not), so the result is
    deterministic and still a prefix-stable subset of the same split."""
    if not 0.0 <= favoured_share <= 1.0:
        raise ValueError(f"favoured_share must be in [0, 1], got {favoured_share}")
    per_type = -(-n // len(spec.qtypes))
    quota = {}
    for qtype in spec.qtypes:
        # A type with a single possible answer (count when every image holds one object) has
        # no other answers to fill the rest of its quota with.
        favoured = per_type if len(answer_options(qtype, spec)) == 1 else round(favoured_share * per_type)
        quota[(qtype, True)], quota[(qtype, False)] = favoured, per_type - favoured
    queries: list[Query] = []
    for q in iter_queries(split, seed, spec):
        key = (q["qtype"], q["answer"] == favoured_answer(q["qtype"], spec))
        if quota[key] > 0:
            quota[key] -= 1
            queries.append(q)
            if len(queries) == n:
                return queries
    raise AssertionError("unreachable: the stream is endless")


def corpus(spec: ShapesSpec | None = None) -> list[str]:
    """Every question and answer word the suite can produce (for tokenizer training)."""
    spec = spec or ShapesSpec()
    lines = ["How many shapes are there?"]
    for c in spec.colors:
        lines.append(ASK_ABOUT["shape"].format(c))
        for s in spec.shapes:
            lines.append(f"Is there a {c} {s}?")
    for s in spec.shapes:
        lines.append(ASK_ABOUT["colour"].format(s))
        lines.append(ASK_ABOUT["position"].format(s))
    lines.extend(sorted(answer_space(spec)))
    return lines


def load_split(split: str, n: int, seed: int, spec: ShapesSpec | None = None):
    """The split as a Hugging Face dataset (image column decoded to PIL on access)."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "boxes": datasets.List(datasets.List(datasets.Value("float32"))),
            "target_box": datasets.List(datasets.Value("float32")),
            "source": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(make_queries(split, n, seed, spec), features=features)
