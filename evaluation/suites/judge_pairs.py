"""Synthetic text-image agreement ratings: the judge task of seeds/soft-rewards.txt on shapes.

A *prompt* describes a scene, e.g. "a red circle and a blue square" (``objects`` objects, each
with a colour and a shape). Each prompt is rendered ``images_per_prompt`` times with distinct
numbers of violated attributes v (0 = the image matches the prompt; every violation changes one
object's colour or shape to another value). The ground-truth rating is

    rating = 1 + (2 * objects - v)          (1 object: ratings 1..3; 2 objects: 1..5)

where v is counted on the image as drawn: the minimum, over assignments of drawn objects to
described objects, of the number of mismatched attributes (so an image that happens to show
the described objects in another arrangement is not penalised). Images whose counted v is not
the intended one are redrawn.

The default is one object: the embedded tiny model learns that task within two GRPO rounds,
while two objects (1..5) stay near chance even under supervised training of a few hundred
steps. The judge sees the image and the question "Rate 1 to 3 how well the image matches:
<prompt>." and answers "Score: k" (``evaluation.rating_rewards.format_rating``); the query's
``answer`` is that ideal response, so ``parse_rating(answer)`` is the true rating.

Splits are deterministic per (split, seed) and use their own random streams: the ``train`` pool
feeds the rounds, ``test`` holds the held-out pairs (two images of the same prompt with
different true ratings).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

from evaluation.metrics import normalise
from evaluation.rating_rewards import format_rating
from evaluation.suites.shapes import ShapesSpec, render, spec_from_config
from models.records import Query

SPLITS = ("sft", "train", "test")
ATTRIBUTES = ("color", "shape")


@dataclass
class JudgePairsSource:
    """The judge task as a query source (conf/data/judge_pairs.yaml).

    ``suite`` holds ShapesSpec overrides (colours, shapes, sizes); it is shared with the tiny
    model's build (conf/model/tiny.yaml interpolates ``data.source.suite``)."""

    suite: dict = field(default_factory=dict)
    objects: int = 1
    images_per_prompt: int = 3
    question: str = "Rate 1 to {max_rating} how well the image matches: {description}."

    def __post_init__(self) -> None:
        if self.objects < 1:
            raise ValueError(f"data.source.objects={self.objects} must be >= 1")
        levels = len(ATTRIBUTES) * self.objects + 1
        if not 1 <= self.images_per_prompt <= levels:
            raise ValueError(f"data.source.images_per_prompt={self.images_per_prompt} must be in 1..{levels} "
                             f"(distinct violation counts of {self.objects} objects)")

    @classmethod
    def from_config(cls, source_cfg: dict) -> JudgePairsSource:
        """The source a ``data.source`` config describes; a clear error if it is another source."""
        target = f"{cls.__module__}.{cls.__qualname__}"
        if source_cfg.get("_target_") != target:
            raise ValueError(f"data.source._target_={source_cfg.get('_target_')!r}: the judge task needs "
                             f"data=judge_pairs ({target})")
        return cls(**{k: v for k, v in source_cfg.items() if k != "_target_"})

    def spec(self) -> ShapesSpec:
        spec = spec_from_config(dict(self.suite))
        if len(spec.colors) < 2 or len(spec.shapes) < 2:
            raise ValueError("the judge task needs at least two colours and two shapes to draw violations")
        return spec

    def ratings(self) -> list[int]:
        return list(range(1, len(ATTRIBUTES) * self.objects + 2))

    def groups(self, split: str, n_prompts: int, seed: int) -> list[list[Query]]:
        """``n_prompts`` prompts, each with its ``images_per_prompt`` rated images. Deterministic."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        spec = self.spec()
        rng = random.Random(f"judge_pairs-{split}-{seed}")
        return [self._group(rng, spec, f"judge-{split}-{seed}-{p}") for p in range(n_prompts)]

    def queries(self, split: str, start: int, stop: int, seed: int) -> list[Query]:
        """Queries [start, stop) of the split's stream (prompt groups laid end to end)."""
        n_prompts = math.ceil(stop / self.images_per_prompt)
        return [q for group in self.groups(split, n_prompts, seed) for q in group][start:stop]

    def answer_space(self) -> set[str]:
        """Normalised well-formed answers ("score 1" ...), for exact-match evaluation."""
        return {normalise(format_rating(r)) for r in self.ratings()}

    # --- one prompt ---------------------------------------------------------------------------

    def _group(self, rng: random.Random, spec: ShapesSpec, group_id: str) -> list[Query]:
        described = rng.sample([(c, s) for c in spec.colors for s in spec.shapes], self.objects)
        description = " and ".join(f"a {c} {s}" for c, s in described)
        max_rating = self.ratings()[-1]
        question = self.question.format(max_rating=max_rating, description=description)
        levels = rng.sample(range(max_rating), self.images_per_prompt)
        group = []
        for j, violations in enumerate(levels):
            drawn = _violate(described, violations, rng, spec)
            boxes = _place(len(drawn), rng, spec)
            objects = [{"color": c, "shape": s, "box": b} for (c, s), b in zip(drawn, boxes)]
            group.append(Query(
                id=f"{group_id}-{j}", image=render(objects, spec), question=question,
                answer=format_rating(max_rating - violations), qtype="rating",
                boxes=[[float(v) for v in b] for b in boxes], target_box=[], source="judge_pairs",
            ))
        return group


def count_violations(described: list[tuple[str, str]], drawn: list[tuple[str, str]]) -> int:
    """Mismatched attributes under the best assignment of drawn to described objects."""
    return min(
        sum((a[0] != b[0]) + (a[1] != b[1]) for a, b in zip(described, perm))
        for perm in itertools.permutations(drawn)
    )


def _violate(described: list[tuple[str, str]], violations: int, rng: random.Random,
             spec: ShapesSpec) -> list[tuple[str, str]]:
    """``described`` with ``violations`` attributes changed, so that count_violations == violations."""
    slots = [(i, a) for i in range(len(described)) for a in range(len(ATTRIBUTES))]
    options = (spec.colors, spec.shapes)
    for _ in range(1000):
        drawn = [list(obj) for obj in described]
        for i, a in rng.sample(slots, violations):
            drawn[i][a] = rng.choice([v for v in options[a] if v != described[i][a]])
        result = [tuple(obj) for obj in drawn]
        if count_violations(described, result) == violations:
            return result
    raise ValueError(f"could not draw {violations} violations of {described} with this suite")


def _place(n: int, rng: random.Random, spec: ShapesSpec) -> list[list[int]]:
    """``n`` square boxes inside the image, 2 px apart (rejection sampling)."""
    for _ in range(1000):
        boxes = []
        for _ in range(n):
            size = rng.randint(spec.min_size, spec.max_size)
            x0 = rng.randint(1, spec.image_size - size - 1)
            y0 = rng.randint(1, spec.image_size - size - 1)
            boxes.append([x0, y0, x0 + size, y0 + size])
        if all(a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]
               for a, b in itertools.combinations(boxes, 2)):
            return boxes
    raise ValueError(f"could not place {n} objects of size {spec.min_size}-{spec.max_size} "
                     f"in a {spec.image_size} px image")
