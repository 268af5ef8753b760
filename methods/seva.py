"""SeVa: self-supervised visual preference alignment (seeds/seva.txt).

One round, for each query of the slice:
    chosen   = greedy answer on the original image
    rejected = greedy answer on the augmented image T(I) (default: diffusion noise, t=800)
Pairs whose two answers are equal (after normalisation) carry no preference and are dropped.
Training uses the ORIGINAL image for both responses (the pair's ``images``).
The judge's scores are recorded for diagnostics; SeVa's pairing does not use them.

``anchor_equal`` (off by default, as in the paper; conf/method/seva.yaml) keeps a
query whose answers are all equal as an *anchor*: a pair whose chosen and rejected are both
the clean answer. Its DPO term is exactly zero (equal log-ratios), so with a loss that has an
NLL term (``loss=dpo_nll``) it only adds the NLL of the clean answer. Why: pairs exist only
where the clean answer differs from the noised one, and on one-word answers the noised answer
is mostly the policy's blind guess for the question type ("two", "no", "left"), so DPO on
those pairs alone lowers that answer for every image (measured: count answers "one" 79 -> 160
of 200 in three rounds, accuracy 0.624 -> 0.567). The anchors hold the answers the policy
already gives where noise does not change them.

``temperature`` (0 by default: greedy on both images, as the released code decodes,
data/step2/generate_with_aug.py) > 0 samples one answer per image instead. Why it matters: a
greedy chosen is already the policy's argmax, so DPO on greedy pairs only sharpens it and moves
other answers by a shift of the answer prior. With sampled answers the expected push on answer
y for image I is proportional to p(y | I) - p(y | T(I)) (a pair forms, chosen y, whenever the
augmented sample differs): it raises the answers the image supports more than the augmented
view does, per image, which is the contrast visual contrastive decoding (SeVa's ref. [17])
applies at decoding time. The NLL of a sampled chosen has zero expected gradient, so
``loss=dpo_nll`` only steadies it. Measured on the embedded default (README,
``experiment=seva_sampled_tuning``): sampled chosen answers are right hardly more often than
sampled rejected ones, and every arm ends below its base.

``shared_noise`` (with ``temperature`` > 0) samples every view with the same random numbers,
reseeded per batch, so two views' answers differ only where their answer distributions do,
not by the chance of two independent draws; the expected push stays p(y | I) - p(y | T(I)).
Measured with RandFlip (README, ``experiment=seva_flip_tuning``): pairs fall from ~270 to ~30
a round, chosen right 0.82, and the base still does not gain beyond noise.

With several ``augmentations`` (e.g. [diffusion, crop, moco]) each gives one rejected
candidate; the first answer that differs from the chosen one is ``rejected`` and the other
differing answers go to ``rejected_extra``, for SeVa's multi-negative DPO (appendix, eq. 18).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from evaluation.metrics import normalise
from methods.augment import AUGMENTATIONS, IMAGE_AUGMENTATIONS, DiffusionNoise
from models.records import Candidate, Pair, Query, Scored, assistant_message, user_prompt
from models.sampling import Policy


@dataclass
class SeVa:
    augmentations: list[str] = field(default_factory=lambda: ["diffusion"])
    noise_step: int = 800
    strength: float = 0.5  # crop / moco strength in [0, 1]
    max_new_tokens: int = 8
    anchor_equal: bool = False  # keep equal-answer queries as NLL-only anchors (docstring)
    temperature: float = 0.0  # 0: greedy on both images (the released code); > 0: one sample each
    shared_noise: bool = False  # temperature > 0: both images sampled with the same random numbers

    def __post_init__(self) -> None:
        unknown = [a for a in self.augmentations if a not in AUGMENTATIONS]
        if unknown or not self.augmentations:
            raise ValueError(f"method.augmentations={self.augmentations}: choose one or more of {AUGMENTATIONS}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"method.strength={self.strength} must be in [0, 1]")
        if self.temperature < 0:
            raise ValueError(f"method.temperature={self.temperature} must be >= 0 (0 decodes greedily)")
        if self.shared_noise and self.temperature == 0:
            raise ValueError("method.shared_noise=true needs method.temperature > 0 (greedy decoding draws no noise)")

    def generate(self, policy: Policy, queries: list[Query], seed: int) -> list[Candidate]:
        prompts = [user_prompt(q["question"]) for q in queries]
        images = [[q["image"]] for q in queries]
        answers = {"none": policy.generate(prompts, images, label="seva clean", **self._decoding(seed, view=0))}
        for i, aug in enumerate(self.augmentations, start=1):
            answers[aug] = self._augmented_answers(policy, prompts, images, aug, seed, self._decoding(seed, view=i))
        return [
            Candidate(query_id=q["id"], candidate_id=f"{q['id']}/{aug}", prompt=prompt, response=texts[i][0],
                      extras={"augmentation": aug})
            for i, (q, prompt) in enumerate(zip(queries, prompts))
            for aug, texts in answers.items()
        ]

    def _decoding(self, seed: int, view: int) -> dict:
        """Generation arguments for view 0 (the clean image) or augmentation ``view``: greedy, or
        one sample at ``temperature`` from the view's own seed; with ``shared_noise`` every view
        draws from the round's seed, reseeded per batch (common random numbers)."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens}
        if self.shared_noise:
            return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": seed,
                    "reseed_per_batch": True}
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": seed + view}

    def _augmented_answers(self, policy: Policy, prompts, images, aug: str, seed: int,
                           decoding: dict) -> list[list[str]]:
        label = f"seva {aug}"
        if aug == "diffusion":
            noise = DiffusionNoise(self.noise_step, seed=seed)
            return policy.generate(prompts, images, pixel_transform=noise, label=label, **decoding)
        rng = random.Random(f"{seed}-{aug}")
        augment = IMAGE_AUGMENTATIONS[aug]
        changed = [[augment(img, rng, self.strength) for img in imgs] for imgs in images]
        return policy.generate(prompts, changed, label=label, **decoding)

    def pair(self, scored: list[Scored], queries: dict[str, Query], seed: int) -> tuple[list[Pair], dict]:
        by_query: dict[str, dict[str, Scored]] = {}
        for s in scored:
            by_query.setdefault(s["query_id"], {})[s["extras"]["augmentation"]] = s
        pairs, equal, anchors = [], 0, 0
        for qid, cands in by_query.items():
            chosen = cands.pop("none")
            negatives, seen = [], {normalise(chosen["response"])}
            for cand in cands.values():  # in augmentation order
                if normalise(cand["response"]) not in seen:
                    seen.add(normalise(cand["response"]))
                    negatives.append(cand)
            if not negatives:
                if self.anchor_equal and chosen["response"].strip():
                    anchors += 1
                    pairs.append(Pair(
                        pair_id=f"{qid}/seva-anchor", query_id=qid, prompt=chosen["prompt"],
                        images=[queries[qid]["image"]], chosen=assistant_message(chosen["response"]),
                        rejected=assistant_message(chosen["response"]), score_chosen=chosen["score"],
                        score_rejected=chosen["score"], rejected_extra=[], method="seva-anchor",
                    ))
                else:
                    equal += 1
                continue
            rejected = negatives[0]
            pairs.append(Pair(
                pair_id=f"{qid}/seva", query_id=qid, prompt=chosen["prompt"], images=[queries[qid]["image"]],
                chosen=assistant_message(chosen["response"]), rejected=assistant_message(rejected["response"]),
                score_chosen=chosen["score"], score_rejected=rejected["score"],
                rejected_extra=[n["response"] for n in negatives[1:]], method="seva",
            ))
        return pairs, {"dropped_equal": equal, "anchors": anchors}
