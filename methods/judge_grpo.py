"""Judge GRPO: train the policy as a VLM rating judge with GRPO and soft rewards
(seeds/soft-rewards.txt; METHODS.md "Soft-reward judges").

Task (data=judge_pairs): given an image and a prompt describing it, answer "Score: k", how well
the image matches (1..max_rating, from the number of violated attributes).
Run: ``python -m flows.iterate method=judge_grpo`` (conf/method/judge_grpo.yaml re-defaults
judge=grpo_reward, data=judge_pairs and train=grpo).

One round, in the five stages:
    generate  G rollouts per query from the round's starting policy (temperature 1)
    score     judge=grpo_reward: format + exact + approximate match (1 / 0.75 / 0.5 / 0)
    pair      one training row per query: its G rollouts, rewards and group-normalised
              advantages; groups whose rewards are all equal carry no signal and are dropped
              (``drop_flat_groups``). Hook ``reference_pass``: the old policy's log-probs of
              every rollout, computed once (the round's starting policy = old = reference).
    train     hook ``train``: GRPO (models/grpo.py), clipped ratio + k3 KL.
    evaluate  hook ``evaluate``: pairwise accuracy on held-out pairs (two images of one
              prompt with different true ratings), soft (expected rating over the rating
              tokens) and Mean@k (mean of k sampled ratings), plus rating accuracy.

Rollouts (``rollout``):
- ``rated`` (default): "Score: " is forced and the rating is drawn from the softmax over the
  rating tokens only, i.e. the soft-reward distribution. The embedded tiny model puts ~1e-6 of
  its mass on digits after "Score:" (it was never trained to rate), so free sampling would give
  only unparseable rollouts, all-equal rewards and zero advantages. Departure from the paper:
  the format reward is then always 1 (kept, and reported).
- ``free`` (the paper's setting, for models that follow the instruction): free text at
  temperature 1 (reasoning allowed), parsed for a final "Score: k".

Hooks the stages call when a method has them (DPO methods have none and keep their path):
``reference_pass(policy, rows, train_cfg)`` in tasks/pair.py, ``train(model, processor, rows,
train_cfg, seed)`` in tasks/train.py, ``evaluate(policy, cfg) -> dict`` for tasks/evaluate.py.
The GRPO objective's settings live here (clip_eps, kl_beta); the ``loss`` group is unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evaluation.judges import expected_rating
from evaluation.rating_rewards import (
    RATING_MARKER,
    format_rating,
    mean_at_k,
    ordered_pairs,
    pairwise_accuracy,
    parse_rating,
)
from evaluation.suites.judge_pairs import JudgePairsSource
from models.grpo import (
    FreeRollouts,
    GRPOLoss,
    RatedRollouts,
    RolloutGroup,
    group_advantages,
    rollout_logps,
    split_last_token,
    train_grpo,
)
from models.logprobs import EncodedPrompt, completion_ids, encode_prompt
from models.records import Candidate, Query, Scored, group_by_query, user_prompt
from models.sampling import Policy

ROLLOUTS = ("rated", "free")


@dataclass
class JudgeGRPO:
    group_size: int = 8            # G rollouts per query
    temperature: float = 1.0
    rollout: str = "rated"         # rated | free (module docstring)
    max_rating: int = 3            # ratings 1..max_rating (data=judge_pairs: 1 object -> 3, 2 -> 5)
    max_new_tokens: int = 32       # free rollouts only
    adv_eps: float = 1e-4
    drop_flat_groups: bool = True
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    length_normalise: bool = False
    eval_prompts: int = 200        # held-out prompts (images_per_prompt images each)
    eval_k: int = 3                # Mean@k

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"method.rollout={self.rollout!r}: choose one of {ROLLOUTS}")
        if self.group_size < 2:
            raise ValueError(f"method.group_size={self.group_size} must be >= 2 (advantages are group-relative)")
        if self.temperature <= 0 or (self.rollout == "free" and self.temperature != 1.0):
            raise ValueError(f"method.temperature={self.temperature}: rated rollouts need > 0; free rollouts "
                             "are scored at temperature 1 (the paper's setting)")
        if self.max_rating < 2 or self.eval_k < 1:
            raise ValueError("method.max_rating must be >= 2 and method.eval_k >= 1")

    def ratings(self) -> list[int]:
        return list(range(1, self.max_rating + 1))

    # --- generate -----------------------------------------------------------------------------

    def generate(self, policy: Policy, queries: list[Query], seed: int) -> list[Candidate]:
        for q in queries:
            if parse_rating(q["answer"]) not in self.ratings():
                raise ValueError(f"query {q['id']} has no rating answer in 1..{self.max_rating} "
                                 f"(answer {q['answer']!r}): method=judge_grpo needs data=judge_pairs "
                                 "(its default) and judge=grpo_reward")
        prompts = [user_prompt(q["question"]) for q in queries]
        if self.rollout == "rated":
            samples = self._sample_ratings(self._rating_logits(policy, queries), self.group_size, seed)
            texts = [[format_rating(r) for r in row] for row in samples]
        else:
            texts = policy.generate(prompts, [[q["image"]] for q in queries], max_new_tokens=self.max_new_tokens,
                                    temperature=self.temperature, num_samples=self.group_size, seed=seed,
                                    label="judge_grpo rollouts")
        return [
            Candidate(query_id=q["id"], candidate_id=f"{q['id']}/{j}", prompt=prompt, response=text,
                      extras={"sample": j, "rollout": self.rollout})
            for q, prompt, group in zip(queries, prompts, texts)
            for j, text in enumerate(group)
        ]

    # --- pair: rollout groups with advantages ----------------------------------------------

    def pair(self, scored: list[Scored], queries: dict[str, Query], seed: int) -> tuple[list[dict], dict]:
        """One row per query: prompt, images, the G completions, rewards, advantages."""
        by_query = group_by_query(scored)
        rows, flat = [], 0
        for qid, cands in by_query.items():
            cands.sort(key=lambda c: c["extras"]["sample"])
            rewards = [c["score_parts"]["reward"] for c in cands]
            if self.drop_flat_groups and max(rewards) == min(rewards):
                flat += 1
                continue
            advantages = group_advantages(torch.tensor([rewards], dtype=torch.float64), self.adv_eps)[0]
            rows.append({
                "group_id": qid, "prompt": cands[0]["prompt"], "images": [queries[qid]["image"]],
                "completions": [c["response"] for c in cands], "rewards": rewards,
                "advantages": advantages.tolist(), "method": "judge_grpo",
            })
        n = max(1, len(scored))
        counts = {
            "groups": len(rows), "dropped_flat_groups": flat,
            "mean_reward": sum(s["score_parts"]["reward"] for s in scored) / n,
            "format_rate": sum(s["score_parts"]["format"] for s in scored) / n,
            "exact_rate": sum(s["score_parts"]["exact"] for s in scored) / n,
        }
        return rows, counts

    # --- hook of the pair stage: old (= reference) log-probs ---------------------------------

    def reference_pass(self, policy: Policy, rows: list[dict], train_cfg: dict) -> tuple[list[dict], int]:
        """Rows with ``old_logps`` [G] under the round's starting policy; groups longer than
        train.max_length are dropped (returned count), never truncated."""
        groups, kept, dropped = self._encode(policy.processor, rows, train_cfg["max_length"])
        old = rollout_logps(policy.model, groups, self._rollout_policy(policy.processor), train_cfg["ref_batch_size"])
        return [rows[i] | {"old_logps": o} for i, o in zip(kept, old)], dropped

    # --- hook of the train stage: GRPO ---------------------------------------------------------

    def train(self, model, processor, rows: list[dict], train_cfg: dict, seed: int) -> list[dict]:
        groups, kept, _ = self._encode(processor, rows, train_cfg["max_length"])
        old = torch.tensor([rows[i]["old_logps"] for i in kept], dtype=torch.float32)
        advantages = torch.tensor([rows[i]["advantages"] for i in kept], dtype=torch.float32)
        loss = GRPOLoss(self.clip_eps, self.kl_beta, self.length_normalise)
        # old policy = reference = the round's starting policy (one set of log-probs)
        return train_grpo(model, groups, old, old, advantages, self._rollout_policy(processor), loss,
                          train_cfg, seed)

    # --- hook of the evaluate stage: pairwise accuracy, soft and Mean@k ------------------------

    def evaluate(self, policy: Policy, cfg: dict) -> dict:
        """Held-out pairwise accuracy of the judge on data=judge_pairs' test split."""
        source = JudgePairsSource.from_config(cfg["data"]["source"])
        if source.ratings() != self.ratings():
            raise ValueError(f"data.source rates 1..{source.ratings()[-1]} but method.max_rating={self.max_rating}")
        groups = source.groups("test", self.eval_prompts, cfg["seed"])
        queries = [q for g in groups for q in g]
        truths = [parse_rating(q["answer"]) for q in queries]
        pairs = ordered_pairs(truths, [str(i) for i, g in enumerate(groups) for _ in g])
        if self.rollout == "rated":
            logits = self._rating_logits(policy, queries)
            greedy = [self.ratings()[i] for i in logits.argmax(-1).tolist()]
            samples = self._sample_ratings(logits, self.eval_k, cfg["seed"])
        else:
            prompts, images = [user_prompt(q["question"]) for q in queries], [[q["image"]] for q in queries]
            texts = [t[0] for t in policy.generate(prompts, images, max_new_tokens=self.max_new_tokens,
                                                   label="judge_grpo eval greedy")]
            greedy = [parse_rating(t) for t in texts]
            # The soft rating is read where the greedy answer gives (or would give) its rating.
            leads = [t.rsplit(RATING_MARKER, 1)[0].strip() for t in texts]
            logits = self._rating_logits(policy, queries, leads)
            sampled = policy.generate(prompts, images, max_new_tokens=self.max_new_tokens, temperature=1.0,
                                      num_samples=self.eval_k, seed=cfg["seed"], label="judge_grpo eval samples")
            samples = [[parse_rating(t) for t in row] for row in sampled]
        soft = expected_rating(logits.cpu(), self.ratings())[0].tolist()
        return {
            "pairwise_accuracy/soft": pairwise_accuracy(soft, pairs),
            "pairwise_accuracy/greedy": pairwise_accuracy(greedy, pairs),
            "pairwise_accuracy/mean_at_1": pairwise_accuracy(mean_at_k(samples, 1), pairs),
            f"pairwise_accuracy/mean_at_{self.eval_k}": pairwise_accuracy(mean_at_k(samples, self.eval_k), pairs),
            "rating/exact": sum(g == t for g, t in zip(greedy, truths)) / len(truths),
            "rating/mae_soft": sum(abs(s - t) for s, t in zip(soft, truths)) / len(truths),
            "rating/mean_soft": sum(soft) / len(soft),
            "rating/format_rate": sum(g is not None for g in greedy) / len(greedy),
            "n/judge_pairs": len(pairs),
        }

    # --- helpers ---------------------------------------------------------------------------

    def _rated(self, processor, lead: str = "") -> tuple[list[int], list[int]]:
        """(ids of the forced answer prefix after ``lead``, one token id per rating)."""
        texts = [f"{lead} {format_rating(r)}".strip() for r in self.ratings()]
        return split_last_token(processor.tokenizer, texts)

    def _rollout_policy(self, processor):
        pad = processor.tokenizer.pad_token_id
        if self.rollout == "rated":
            return RatedRollouts(self._rated(processor)[1], pad, self.temperature)
        return FreeRollouts(pad)

    def _sample_ratings(self, rating_logits: torch.Tensor, k: int, seed: int) -> list[list[int]]:
        """k ratings per row drawn from softmax(rating_logits / temperature) (rated rollouts)."""
        probs = (rating_logits / self.temperature).softmax(-1)
        picks = torch.multinomial(probs, k, replacement=True, generator=torch.Generator().manual_seed(seed))
        return [[self.ratings()[i] for i in row] for row in picks.tolist()]

    def _rating_logits(self, policy: Policy, queries: list[Query], leads: list[str] | None = None) -> torch.Tensor:
        """[N, R] rating-token logits after "<lead> Score:" for each query, no grad."""
        processor = policy.processor
        answer_prefix, rating_ids = self._rated(processor)
        prompts = []
        for i, q in enumerate(queries):
            prefix = answer_prefix
            if leads and leads[i]:
                prefix, ids = self._rated(processor, leads[i])
                if ids != rating_ids:
                    raise ValueError("the rating tokens change with the preceding text; soft ratings need single tokens")
            prompt = encode_prompt(processor, user_prompt(q["question"]), [q["image"]])
            prompts.append(EncodedPrompt(prompt.ids + prefix, prompt.vision))
        scorer = RatedRollouts(rating_ids, processor.tokenizer.pad_token_id)
        policy.model.eval()
        with torch.inference_mode():
            return torch.cat([scorer.rating_logits(policy.model, prompts[s : s + policy.batch_size])
                              for s in range(0, len(prompts), policy.batch_size)])

    def _encode(self, processor, rows: list[dict], max_length: int) -> tuple[list[RolloutGroup], list[int], int]:
        """Tokenise rollout groups once; (groups, indices kept, number dropped as over-long)."""
        tokenizer = processor.tokenizer
        if self.rollout == "rated":
            prefix, rating_ids = self._rated(processor)
            token_of = dict(zip(self.ratings(), rating_ids))
        groups, kept, dropped = [], [], 0
        for i, row in enumerate(rows):
            prompt = encode_prompt(processor, row["prompt"], list(row["images"]))
            if self.rollout == "rated":
                prompt = EncodedPrompt(prompt.ids + prefix, prompt.vision)
                completions = [[token_of[parse_rating(t)], tokenizer.eos_token_id] for t in row["completions"]]
            else:
                completions = [completion_ids(tokenizer, t) for t in row["completions"]]
            if len(prompt.ids) + max(len(c) for c in completions) > max_length:
                dropped += 1
                continue
            groups.append(RolloutGroup(prompt, completions))
            kept.append(i)
        return groups, kept, dropped
