"""Forward passes that read a policy rather than train it: what judges and methods need beyond
plain sampling (``models.sampling``).

``answer_token_ids(tokenizer, words)``
    The token a model emits first when it answers each word (" yes", "1", ...), found the way
    ``models.logprobs.completion_ids`` encodes a completion, so it is the token the policy was
    trained to emit after the generation prompt.
``next_token_logits(policy, prompts, images, token_ids)`` -> [B, K]
    The logits of the next token after each prompt's generation prompt, restricted to
    ``token_ids`` (in that order). Prompts are chat messages WITH their images; batches are
    left padded with explicit position ids (``models.logprobs.collate``) and only the last
    position reaches the LM head (``logits_to_keep=1``).
``completion_logps(policy, encoded_prompts, responses)`` -> [B][n] summed log-probs
    Of the n responses (EOS included) of each encoded prompt, the image and prompt computed
    once per prompt (``models.logprobs.shared_prefix_logps``), e.g. for the DPO implicit reward.
``continue_responses(policy, prompts, images, prefixes)`` -> list[str]
    Each prompt's assistant turn started with ``prefix`` and continued by the model, e.g.
    MPO's DropoutNTP continuation WITHOUT the image (``images`` of [] per prompt).

The pure probability math on these logits lives with the judges (``evaluation.judges``).
"""

from __future__ import annotations

import torch

from models.logprobs import (
    EncodedPrompt,
    collate,
    collate_shared,
    completion_ids,
    encode_prompt,
    shared_prefix_logps,
)
from models.progress import Progress
from models.sampling import Policy, banned_token_ids


def answer_token_ids(tokenizer, words: list[str]) -> list[int]:
    """First token of each word as the policy would emit it; distinct ids or a ValueError.

    A leading whitespace-only token (SentencePiece's lone "▁" before a capitalised word) is
    skipped. Two words sharing their first token ("10" and "1" in some vocabularies) cannot
    be told apart from one next-token distribution, which fails loudly instead of silently
    merging their probabilities."""
    ids = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        while tokens and not tokenizer.decode(tokens[:1]).strip():
            tokens = tokens[1:]
        if not tokens:
            raise ValueError(f"{word!r} encodes to no token in this tokenizer")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        shown = {w: tokenizer.convert_ids_to_tokens(i) for w, i in zip(words, ids)}
        raise ValueError(f"answer words share a first token, so their probabilities cannot be "
                         f"separated: {shown}; choose words that start with different tokens")
    return ids


def _encode(policy: Policy, prompts: list[list[dict]], images: list[list]) -> list[EncodedPrompt]:
    return [encode_prompt(policy.processor, p, list(imgs or [])) for p, imgs in zip(prompts, images)]


@torch.no_grad()
def next_token_logits(
    policy: Policy,
    prompts: list[list[dict]],
    images: list[list],
    token_ids: list[int],
    batch_size: int | None = None,
    label: str = "next-token logits",
) -> torch.Tensor:
    """[B, K] float32 logits of ``token_ids`` at the position after each prompt (with images)."""
    model, processor = policy.model, policy.processor
    batch_size = batch_size or policy.batch_size
    device = next(model.parameters()).device
    model.eval()
    rows = []
    progress = Progress(label, len(prompts), unit="prompts")
    index = torch.tensor(token_ids, device=device)
    for start in range(0, len(prompts), batch_size):
        encoded = _encode(policy, prompts[start : start + batch_size], images[start : start + batch_size])
        batch = collate(encoded, [[] for _ in encoded], processor.tokenizer.pad_token_id).to(device)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=1,
            use_cache=False,
            **batch.vision,
        )
        rows.append(out.logits[:, -1].float().index_select(-1, index).cpu())
        progress.update(len(encoded))
    return torch.cat(rows) if rows else torch.zeros(0, len(token_ids))


@torch.no_grad()
def completion_logps(
    policy: Policy,
    prompts: list[EncodedPrompt],
    responses: list[list[str]],
    batch_size: int | None = None,
    label: str = "completion log-probs",
) -> list[list[float]]:
    """Summed log pi(response | prompt, images) (EOS included) of the n responses of each
    prompt; every prompt has the same number n >= 1 of responses. The image and prompt run once
    per prompt and its n responses continue from the cached prefix
    (``models.logprobs.shared_prefix_logps``); ``batch_size`` counts prompts."""
    model, tokenizer = policy.model, policy.processor.tokenizer
    batch_size = batch_size or policy.batch_size
    device = next(model.parameters()).device
    model.eval()
    out: list[list[float]] = []
    progress = Progress(label, len(prompts), unit="prompts")
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        completions = [[completion_ids(tokenizer, r) for r in rs] for rs in responses[chunk]]
        batch = collate_shared(prompts[chunk], completions, tokenizer.pad_token_id).to(device)
        logps, _ = shared_prefix_logps(model, batch)
        out += logps.tolist()
        progress.update(len(completions))
    return out


@torch.no_grad()
def continue_responses(
    policy: Policy,
    prompts: list[list[dict]],
    images: list[list],
    prefixes: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    batch_size: int | None = None,
    label: str = "continue",
) -> list[str]:
    """The full assistant response (prefix + continuation) for each prompt.

    The sequence is the prompt ids (generation prompt included) followed by the prefix's
    completion tokens without EOS, exactly as a response starting with ``prefix`` is encoded
    for training; an empty prefix means a fresh answer. ``images`` holds [] for a text-only
    prompt (no image placeholders in its messages). Greedy when temperature == 0."""
    if seed is not None:
        torch.manual_seed(seed)
    model, processor = policy.model, policy.processor
    tokenizer = processor.tokenizer
    batch_size = batch_size or policy.batch_size
    device = next(model.parameters()).device
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    outputs: list[str] = []
    progress = Progress(label, len(prompts), unit="responses")
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        encoded = _encode(policy, prompts[chunk], images[chunk])
        prefix_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if p.strip() else [] for p in prefixes[chunk]]
        batch = collate(encoded, prefix_ids, tokenizer.pad_token_id).to(device)
        out = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            suppress_tokens=banned_token_ids(processor),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **batch.vision,
            **sampling,
        )
        new_tokens = out[:, batch.input_ids.shape[1] :].tolist()
        for prefix, new in zip(prefix_ids, new_tokens):
            outputs.append(tokenizer.decode(prefix + new, skip_special_tokens=True).strip())
        progress.update(len(encoded))
    return outputs
