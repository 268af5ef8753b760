"""UV-CoT: unsupervised visual chain of thought by box preference (seeds/uv-cot.txt,
Algorithm 1, eq. 1; the Algorithm 2 loop is flows/iterate.py; the loss, eq. 2, is
``loss=sdpo``, selected by conf/method/uvcot.yaml).

The chain has T = 2 steps for every query x (y_0 = x):

    step 1 (box)     y_1 = a box text. The policy is asked the question plus BOX_SUFFIX;
                     ``n_boxes`` boxes are sampled at ``box_temperature`` (released code: 10 at 0.7).
    step 2 (answer)  y_2 = an answer. The box is parsed (methods/boxes.py; fallback box when the
                     text holds no box), its region cropped (the released square crop), and the
                     policy answers a second user turn holding the crop and ANSWER_PROMPT:
                         [user: image + question + BOX_SUFFIX, assistant: y_1,
                          user: crop + "Please answer ... local detail image. {question}"]
                     ``n_next`` answers are sampled per box at ``answer_temperature``.

The judge runs in the score stage, after ``generate`` and before ``pair``, so ``generate``
emits every response the scores need and ``pair`` computes eq. 1 from the scored set:

    candidate (extras["role"])      judge score is           used as
    box     (step 1, "box")         f_eval(y_1 | x)          s_cur of the box (box_s_cur="judge")
    sample  (step 2, "sample")      f_eval(y_2 | x, y_1)     one Monte-Carlo draw of s_next of its
                                                             box; s_cur of the answer at step 2
    greedy  (step 2, "greedy")      f_eval(greedy y_2 | ..)  s_cur of its box (box_s_cur="greedy")

Eq. 1, per step:
    box i:     s_cur  = the judge's score of the box response itself (Algorithm 1 line 6:
                        f_eval(y_1^i | y_0)); 0 when the text is no box (see below).
               s_next = mean judge score of the n_next answers sampled under box i
                        (the paper's E[f_eval(y_2 | y_0, y_1^i)], "estimated by sampling")
               s      = s_cur + gamma * s_next
    answer j:  s      = s_cur = its judge score (gamma = 0 at the last step, no s_next)

``box_s_cur`` chooses s_cur of a box: "judge" (default, the equation as written; a model
evaluator rates the box response directly), "greedy" (the judge's score of the greedy answer
under the box: the box's deterministic outcome, for judges that can only score answers), or
"zero" (boxes are valued only through gamma * s_next). Under "judge", a step-1 response that
is no box (e.g. the tiny model answering "red" straight away) gets s_cur = 0: a correctness
judge would otherwise reward skipping the box step. With the correctness judge every real box
scores 0 as an answer, so box ranking is by gamma * s_next alone; gamma = 0 then leaves no box
preference at all, the extreme of the paper's "w/o gamma" ablation (-8.8 points).

Pairs (Algorithm 1 lines 7-8), per query and step: ``k`` random (preferred, dis-preferred)
pairs among the step's responses with a strictly higher s for the preferred one and a
different meaning, each pair carrying both s (score_chosen / score_rejected, for Score-DPO's
margin); each (meaning_w, meaning_l) combination is offered once.
    step 1: prompt = the first user turn, images = [original]; chosen / rejected = box texts.
            Meaning = the pixel box (``drop_same_box``, default): two texts that resolve to the
            same box (e.g. two texts without a box, both the fallback box) are no preference;
            with drop_same_box=false, the stripped text.
    step 2: the best chain is kept: the highest-s box (ties: parsed first, then lower index)
            and its n_next answers are the step's responses {y_2^i}. Prompt = the full two-turn
            conversation, images = [original, crop of the best box]; chosen / rejected = answers.
            Meaning = the normalised answer text (evaluation.metrics.normalise).
Departure: Algorithm 1 samples fresh step-2 responses after choosing the best box; here the
answers that estimated the best box's s_next are reused (the judge cannot run inside generate).
They follow the same distribution, but the best box was picked on them, so they lean correct.

Each pair records the query's best chain in ``extras`` (step, best box text and pixels, best
answer, best s, both sides' s_cur / s_next). Box quality on suites with ground-truth boxes
(Query.target_box): counts["box_iou_mean"] is the mean IoU of the best box with the target.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from evaluation.metrics import normalise
from methods.boxes import crop, format_box, iou, resolve_box
from models.records import (
    Candidate,
    Pair,
    Query,
    Scored,
    assistant_message,
    group_by_query,
    user_prompt,
)
from models.sampling import Policy

# The released prompts (UV-CoT code, llava15_gen_data_*.py).
BOX_SUFFIX = " Please provide the bounding box coordinate of the region that can help you answer the question better."
ANSWER_PROMPT = "Please answer the question based on the original image and local detail image. {question}"
BOX_S_CUR = ("judge", "greedy", "zero")


def box_prompt(question: str) -> list[dict]:
    """Step 1's prompt: one user turn, the image and the question with the box request."""
    return user_prompt(question + BOX_SUFFIX)


def answer_prompt(question: str, box_text: str) -> list[dict]:
    """Step 2's prompt: the box turn, the model's box, then a user turn with the crop (the
    second image) and the answer request. Two image placeholders: [original, crop]."""
    return box_prompt(question) + assistant_message(box_text) + user_prompt(ANSWER_PROMPT.format(question=question))


def combined_score(s_cur: float, s_next: float, gamma: float, last_step: bool) -> float:
    """Eq. 1: s = s_cur + gamma * s_next, with gamma = 0 at the last step."""
    return s_cur + (0.0 if last_step else gamma) * s_next


def preference_pairs(items: list, scores: list[float], k: int, rng: random.Random,
                     key: Callable[[object], object]) -> list[tuple[int, int]]:
    """Up to ``k`` random (preferred, dis-preferred) index pairs with scores[w] > scores[l].

    ``key(item)`` is what a response means (its normalised text, or its pixel box): two items
    with the same key carry no preference and are never paired, and each (key_w, key_l)
    combination is offered once, so duplicates of a response do not crowd the sample.
    Deterministic for a given rng state."""
    keys = [key(item) for item in items]
    combos, seen = [], set()
    for w in range(len(items)):
        for lo in range(len(items)):
            if scores[w] > scores[lo] and keys[w] != keys[lo] and (keys[w], keys[lo]) not in seen:
                seen.add((keys[w], keys[lo]))
                combos.append((w, lo))
    return rng.sample(combos, min(k, len(combos)))


def best_index(scores: list[float], tie_keys: list | None = None) -> int:
    """Index of the highest score; ties broken by the larger tie key, then the lower index."""
    keys = tie_keys or [0] * len(scores)
    return max(range(len(scores)), key=lambda i: (scores[i], keys[i], -i))


@dataclass
class UVCoT:
    n_boxes: int = 3  # box samples per query (released code: 10 seeds)
    n_next: int = 2  # answers sampled per box: the Monte-Carlo estimate of s_next
    box_temperature: float = 0.7
    answer_temperature: float = 0.7
    gamma: float = 1.0  # the paper: gamma > 0, value not given
    k: int = 2  # pairs per step per query (released construct_pairs: 2)
    box_s_cur: str = "judge"  # judge | greedy | zero (see the module docstring)
    min_half_frac: float = 0.25  # crop half-size >= this x the image's longer side (released: 168 px of 336)
    drop_same_box: bool = True
    random_boxes: int = 0  # extra uniformly random box proposals per query (off-policy; not in the paper)
    normalise_scores: bool = False  # divide step-1 s by (1 + gamma) so every pair score lies in [0, 1]
    box_max_new_tokens: int = 24
    max_new_tokens: int = 8
    eval_box_cot: bool = True  # read by the evaluate stage: also run box -> crop -> answer (evaluation/boxcot.py)

    def __post_init__(self):
        if self.box_s_cur not in BOX_S_CUR:
            raise ValueError(f"uvcot: box_s_cur={self.box_s_cur!r}; choose one of {BOX_S_CUR}")
        if self.n_boxes + self.random_boxes < 1 or self.n_boxes < 0 or self.random_boxes < 0:
            raise ValueError("uvcot: need n_boxes >= 0, random_boxes >= 0 and at least one box per query")
        if self.n_next < 1:
            raise ValueError("uvcot: n_next must be >= 1 (s_next is estimated from sampled answers)")
        if self.gamma < 0 or self.k < 0:
            raise ValueError("uvcot: gamma and k must be >= 0")
        if not 0 < self.min_half_frac <= 0.5:
            raise ValueError("uvcot: min_half_frac must lie in (0, 0.5] (0.5 = the whole image)")

    # --- shared by generation and box-CoT evaluation ------------------------------------

    def chain_inputs(self, query: Query, box_text: str) -> dict:
        """Step 2's inputs for one box text: pixel box, parsed flag, crop, prompt, images."""
        image = query["image"]
        box, parsed = resolve_box(box_text, *image.size)
        local = crop(image, box, self.min_half_frac)
        return {"box": box, "parsed": parsed, "crop": local,
                "prompt": answer_prompt(query["question"], box_text), "images": [image, local]}

    def infer(self, policy: Policy, queries: list[Query], label: str = "uvcot infer") -> list[dict]:
        """UV-CoT inference (greedy): box, crop, answer. One dict per query with box_text,
        box (pixels), parsed, prompt (the two-turn conversation), answer."""
        boxes = policy.generate([box_prompt(q["question"]) for q in queries], [[q["image"]] for q in queries],
                                max_new_tokens=self.box_max_new_tokens, label=f"{label} boxes")
        inputs = [self.chain_inputs(q, b[0]) for q, b in zip(queries, boxes)]
        answers = policy.generate([i["prompt"] for i in inputs], [i["images"] for i in inputs],
                                  max_new_tokens=self.max_new_tokens, label=f"{label} answers")
        return [{"box_text": b[0], "box": i["box"], "parsed": i["parsed"], "prompt": i["prompt"], "answer": a[0]}
                for b, i, a in zip(boxes, inputs, answers)]

    # --- stage 1: generate -------------------------------------------------------------------

    def generate(self, policy: Policy, queries: list[Query], seed: int) -> list[Candidate]:
        box_prompts = [box_prompt(q["question"]) for q in queries]
        sampled = policy.generate(
            box_prompts, [[q["image"]] for q in queries], max_new_tokens=self.box_max_new_tokens,
            temperature=self.box_temperature, num_samples=self.n_boxes, seed=seed, label="uvcot boxes",
        ) if self.n_boxes else [[] for _ in queries]
        candidates, chains = [], []
        for q, prompt, texts in zip(queries, box_prompts, sampled):
            proposals = [(t, "model") for t in texts]
            proposals += [(t, "random") for t in random_box_texts(q["image"].size, self.random_boxes, f"{seed}/{q['id']}")]
            for i, (text, source) in enumerate(proposals):
                inputs = self.chain_inputs(q, text)
                box_id = f"{q['id']}/box{i}"
                common = {"box_index": i, "box_text": text, "box": inputs["box"], "parsed": inputs["parsed"],
                          "box_source": source}
                candidates.append(Candidate(query_id=q["id"], candidate_id=box_id, prompt=prompt, response=text,
                                            extras={"step": 1, "role": "box", "parent": None, **common}))
                chains.append((q, box_id, common, inputs))
        prompts = [c[3]["prompt"] for c in chains]
        images = [c[3]["images"] for c in chains]
        answers = policy.generate(prompts, images, max_new_tokens=self.max_new_tokens,
                                  temperature=self.answer_temperature, num_samples=self.n_next, seed=seed + 1,
                                  label="uvcot answers")
        greedy = (policy.generate(prompts, images, max_new_tokens=self.max_new_tokens, label="uvcot greedy answers")
                  if self.box_s_cur == "greedy" else [[] for _ in chains])
        for (q, box_id, common, inputs), texts, g in zip(chains, answers, greedy):
            rows = [("sample", j, t) for j, t in enumerate(texts)] + [("greedy", 0, t) for t in g]
            for role, j, text in rows:
                cid = f"{box_id}/ans{j}" if role == "sample" else f"{box_id}/greedy"
                candidates.append(Candidate(query_id=q["id"], candidate_id=cid, prompt=inputs["prompt"], response=text,
                                            extras={"step": 2, "role": role, "sample": j, "parent": box_id, **common}))
        return candidates

    # --- stage 3: pair -----------------------------------------------------------------------

    def box_scores(self, boxes: list[Scored], answers: dict[str, list[Scored]]) -> list[dict]:
        """Eq. 1 for each box: {"s_cur", "s_next", "s"}; ``answers`` maps a box candidate_id to
        its scored step-2 candidates (samples and, if any, the greedy answer)."""
        out = []
        for b in boxes:
            kids = answers.get(b["candidate_id"], [])
            samples = [a["score"] for a in kids if a["extras"]["role"] == "sample"]
            if not samples:
                raise ValueError(f"uvcot: box {b['candidate_id']} has no scored answer samples")
            s_next = sum(samples) / len(samples)
            if self.box_s_cur == "judge":
                s_cur = b["score"] if b["extras"]["parsed"] else 0.0
            elif self.box_s_cur == "greedy":
                greedy = [a["score"] for a in kids if a["extras"]["role"] == "greedy"]
                if not greedy:
                    raise ValueError(f"uvcot: box_s_cur=greedy but box {b['candidate_id']} has no greedy answer")
                s_cur = greedy[0]
            else:
                s_cur = 0.0
            out.append({"s_cur": s_cur, "s_next": s_next, "s": combined_score(s_cur, s_next, self.gamma, last_step=False)})
        return out

    def pair(self, scored: list[Scored], queries: dict[str, Query], seed: int) -> tuple[list[Pair], dict]:
        rng = random.Random(seed)
        by_query = group_by_query(scored)
        pairs: list[Pair] = []
        stats = {"box_pairs": 0, "answer_pairs": 0, "no_box_contrast": 0, "no_answer_contrast": 0}
        ious, chosen_ious, rejected_ious, best_scores, parsed, model_boxes = [], [], [], [], 0, 0
        scale_box = 1.0 / (1.0 + self.gamma) if self.normalise_scores else 1.0
        for qid, cands in by_query.items():
            query = queries[qid]
            boxes = sorted((c for c in cands if c["extras"]["step"] == 1), key=lambda c: c["extras"]["box_index"])
            answers: dict[str, list[Scored]] = {}
            for c in cands:
                if c["extras"]["step"] == 2:
                    answers.setdefault(c["extras"]["parent"], []).append(c)
            values = self.box_scores(boxes, answers)
            s_box = [v["s"] for v in values]
            for b in boxes:
                if b["extras"]["box_source"] == "model":
                    model_boxes += 1
                    parsed += bool(b["extras"]["parsed"])

            # Response selection: the best chain (box, then its best answer).
            best = best_index(s_box, [b["extras"]["parsed"] for b in boxes])
            best_box = boxes[best]
            samples = [a for a in answers[best_box["candidate_id"]] if a["extras"]["role"] == "sample"]
            s_ans = [combined_score(a["score"], 0.0, self.gamma, last_step=True) for a in samples]
            best_answer = samples[best_index(s_ans)]
            chain = {"best_box_text": best_box["response"], "best_box": list(best_box["extras"]["box"]),
                     "best_answer": best_answer["response"], "best_score": s_box[best]}
            best_scores.append(s_box[best])
            target = list(query.get("target_box") or [])
            if target:
                ious.append(iou(best_box["extras"]["box"], target))

            # Step 1 pairs: box texts, first user turn only.
            box_pairs = preference_pairs(boxes, s_box, self.k, rng, self._box_key)
            stats["no_box_contrast"] += not box_pairs
            for w, lo in box_pairs:
                cw, cl = boxes[w], boxes[lo]
                pairs.append(self._pair(qid, 1, cw, cl, s_box[w] * scale_box, s_box[lo] * scale_box, [query["image"]],
                                        values[w], values[lo], chain))
                if target:
                    chosen_ious.append(iou(cw["extras"]["box"], target))
                    rejected_ious.append(iou(cl["extras"]["box"], target))
            stats["box_pairs"] += len(box_pairs)

            # Step 2 pairs: answers under the best box, the full two-turn conversation.
            answer_pairs = preference_pairs(samples, s_ans, self.k, rng, lambda a: normalise(a["response"]))
            stats["no_answer_contrast"] += not answer_pairs
            images = [query["image"], crop(query["image"], best_box["extras"]["box"], self.min_half_frac)]
            for w, lo in answer_pairs:
                cw, cl = samples[w], samples[lo]
                pairs.append(self._pair(qid, 2, cw, cl, s_ans[w], s_ans[lo], images,
                                        {"s_cur": s_ans[w], "s_next": 0.0}, {"s_cur": s_ans[lo], "s_next": 0.0}, chain))
            stats["answer_pairs"] += len(answer_pairs)

        counts = dict(stats)  # (the generate stage already counts queries)
        if model_boxes:
            counts["box_parse_rate"] = parsed / model_boxes
        if best_scores:
            counts["best_chain_score_mean"] = sum(best_scores) / len(best_scores)
        for name, values in (("box_iou_mean", ious), ("box_iou_chosen_mean", chosen_ious),
                             ("box_iou_rejected_mean", rejected_ious)):
            if values:
                counts[name] = sum(values) / len(values)
        return pairs, counts

    def _box_key(self, box: Scored):
        """What a box response means: its pixel box (``drop_same_box``) or its text."""
        return tuple(box["extras"]["box"]) if self.drop_same_box else box["response"].strip()

    def _pair(self, qid: str, step: int, chosen: Scored, rejected: Scored, s_w: float, s_l: float, images: list,
              v_w: dict, v_l: dict, chain: dict) -> Pair:
        return Pair(
            pair_id=f"{chosen['candidate_id']}>{rejected['candidate_id']}", query_id=qid, prompt=chosen["prompt"],
            images=images, chosen=assistant_message(chosen["response"]), rejected=assistant_message(rejected["response"]),
            score_chosen=float(s_w), score_rejected=float(s_l), rejected_extra=[], method="uvcot",
            extras={"step": step, **chain, "chosen_s_cur": float(v_w["s_cur"]), "chosen_s_next": float(v_w["s_next"]),
                    "rejected_s_cur": float(v_l["s_cur"]), "rejected_s_next": float(v_l["s_next"])},
        )


def random_box_texts(size: tuple[int, int], n: int, key: str) -> list[str]:
    """``n`` uniformly random box proposals as normalised text (sides 15-60 % of the image),
    deterministic per ``key``. Off-policy exploration, not in the paper: a policy that never
    emits a parseable box (the tiny default) otherwise yields no box-step contrast."""
    if n <= 0:
        return []
    rng = random.Random(key)
    width, height = size
    texts = []
    for _ in range(n):
        w, h = rng.uniform(0.15, 0.6) * width, rng.uniform(0.15, 0.6) * height
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        texts.append(format_box([x0, y0, x0 + w, y0 + h], width, height))
    return texts
