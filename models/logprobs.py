"""Per-sequence log-probabilities of completions given an (image, prompt) prefix.

A sequence is ``prompt ids (image tokens expanded by the processor) + completion ids + eos``.
Batches are LEFT padded with explicit ``position_ids``, so every completion ends at the last
position and the LM head only needs the last ``max_completion_len + 1`` positions
(``logits_to_keep``): prompt, image and padding positions never reach the vocabulary
projection, and never count in the sums.

Shapes: B sequences, L padded length, K = longest completion + 1.
    input_ids, attention_mask, position_ids: [B, L]; completion_mask: [B, L]
    sequence_logps -> (sum_logp [B], n_tokens [B])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.sampling import prompt_texts


@dataclass
class Encoded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    vision: dict  # processor outputs besides text ids: pixel_values (+ image_sizes, grid_thw...)

    def to(self, device) -> "Encoded":
        return Encoded(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.completion_mask.to(device),
            {k: v.to(device) for k, v in self.vision.items()},
        )


@dataclass
class EncodedPrompt:
    ids: list[int]
    vision: dict


def encode_prompt(processor, prompt: list[dict], images: list) -> EncodedPrompt:
    text = prompt_texts(processor, [prompt])[0]
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return EncodedPrompt(ids=enc["input_ids"][0].tolist(), vision=vision)


def completion_ids(tokenizer, text: str) -> list[int]:
    """The completion as the policy would emit it: its tokens, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def collate(prompts: list[EncodedPrompt], completions: list[list[int]], pad_id: int) -> Encoded:
    """Left-pad prompt+completion sequences; ``prompts[i]`` pairs with ``completions[i]``."""
    seqs = [p.ids + c for p, c in zip(prompts, completions)]
    length = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, length), dtype=torch.long)
    completion_mask = torch.zeros((B, length), dtype=torch.bool)
    for i, (seq, comp) in enumerate(zip(seqs, completions)):
        input_ids[i, length - len(seq) :] = torch.tensor(seq)
        attention_mask[i, length - len(seq) :] = 1
        completion_mask[i, length - len(comp) :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    vision: dict = {}
    keys = {k for p in prompts for k in p.vision}
    for key in keys:
        parts = [p.vision[key] for p in prompts if key in p.vision]
        vision[key] = torch.cat(parts, dim=0)
    return Encoded(input_ids, attention_mask, position_ids, completion_mask, vision)


def sequence_logps(model, batch: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's completion tokens, and their count.

    Position t's logits predict token t+1, so with K = longest completion + 1 the last K
    logits cover every completion token."""
    n_completion = batch.completion_mask.sum(-1)
    keep = int(n_completion.max().item()) + 1
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=keep,
        use_cache=False,
        **batch.vision,
    )
    logits = out.logits[:, :-1].float()  # [B, K-1, V] predicting the last K-1 tokens
    targets = batch.input_ids[:, -(keep - 1) :]
    mask = batch.completion_mask[:, -(keep - 1) :]
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)
