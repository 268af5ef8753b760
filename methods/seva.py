"""SeVa: self-supervised visual preference alignment (seeds/seva.txt).

One round, for each query of the slice:
    chosen   = greedy answer on the original image
    rejected = greedy answer on the augmented image T(I) (default: diffusion noise, t=500)
Pairs whose two answers are equal (after normalisation) carry no preference and are dropped.
Training uses the ORIGINAL image for both responses (the pair's ``images``).
The judge's scores are recorded for diagnostics; SeVa's pairing does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.metrics import normalise
from methods.augment import DiffusionNoise
from models.records import Candidate, Pair, Query, Scored, assistant_message, user_prompt
from models.sampling import Policy


@dataclass
class SeVa:
    noise_step: int = 500
    max_new_tokens: int = 8

    def generate(self, policy: Policy, queries: list[Query], seed: int) -> list[Candidate]:
        prompts = [user_prompt(q["question"]) for q in queries]
        images = [[q["image"]] for q in queries]
        clean = policy.generate(prompts, images, max_new_tokens=self.max_new_tokens, label="seva clean")
        noise = DiffusionNoise(self.noise_step, seed=seed)
        noised = policy.generate(
            prompts, images, max_new_tokens=self.max_new_tokens, pixel_transform=noise, label="seva noised"
        )
        candidates = []
        for q, prompt, c, n in zip(queries, prompts, clean, noised):
            for aug, text in (("none", c[0]), (f"diffusion{self.noise_step}", n[0])):
                candidates.append(Candidate(query_id=q["id"], candidate_id=f"{q['id']}/{aug}", prompt=prompt,
                                            response=text, extras={"augmentation": aug}))
        return candidates

    def pair(self, scored: list[Scored], queries: dict[str, Query], seed: int) -> tuple[list[Pair], dict]:
        by_query: dict[str, dict[str, Scored]] = {}
        for s in scored:
            key = "chosen" if s["extras"]["augmentation"] == "none" else "rejected"
            by_query.setdefault(s["query_id"], {})[key] = s
        pairs, equal = [], 0
        for qid, both in by_query.items():
            chosen, rejected = both["chosen"], both["rejected"]
            if normalise(chosen["response"]) == normalise(rejected["response"]):
                equal += 1
                continue
            pairs.append(Pair(
                pair_id=f"{qid}/seva", query_id=qid, prompt=chosen["prompt"], images=[queries[qid]["image"]],
                chosen=assistant_message(chosen["response"]), rejected=assistant_message(rejected["response"]),
                score_chosen=chosen["score"], score_rejected=rejected["score"], rejected_extra=[], method="seva",
            ))
        return pairs, {"dropped_equal": equal}
