"""Batched generation from a VLM policy (Hugging Face ``generate``, left padding).

Tokens that must never be sampled (the image placeholder, padding, BOS) are suppressed:
sampling the ``<image>`` token at temperature 1 makes LLaVA fail with an image-token /
feature mismatch (see TINY-DEFAULT.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.progress import Progress


def prompt_texts(processor, prompts: list[list[dict]]) -> list[str]:
    return [processor.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]


def banned_token_ids(processor) -> list[int]:
    tok = processor.tokenizer
    ids = {tok.pad_token_id, tok.bos_token_id, getattr(processor, "image_token_id", None)}
    return sorted(i for i in ids if i is not None and i != tok.eos_token_id)


@torch.no_grad()
def generate(
    model,
    processor,
    prompts: list[list[dict]],
    images: list[list],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 32,
    label: str = "generate",
    seed: int | None = None,
    pixel_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reseed_per_batch: bool = False,
) -> list[list[str]]:
    """``num_samples`` responses per prompt; greedy when temperature == 0.

    ``reseed_per_batch`` (with ``seed``) reseeds torch at every batch from ``seed`` and the
    batch's first index, so two calls with the same seed and batch layout draw the same noise
    for each prompt even when one call's earlier batches ran more decoding steps: common random
    numbers, which SeVa's ``shared_noise`` uses to sample two views of an image alike.

    ``pixel_transform`` edits the processed (normalised) pixel tensor before the model sees
    it, which is where SeVa's released code applies its diffusion noise.
    Returns one list of decoded strings (special tokens removed, stripped) per prompt.
    """
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    texts = prompt_texts(processor, prompts)
    device = next(model.parameters()).device
    model.eval()
    outputs: list[list[str]] = []
    progress = Progress(label, len(prompts) * num_samples, unit="samples")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            batch_texts = texts[start : start + batch_size]
            batch_images = [img for imgs in images[start : start + batch_size] for img in imgs]
            if seed is not None and reseed_per_batch:
                torch.manual_seed(seed + start)
            inputs = processor(text=batch_texts, images=batch_images or None, padding=True, return_tensors="pt")
            if pixel_transform is not None:
                inputs["pixel_values"] = pixel_transform(inputs["pixel_values"])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                suppress_tokens=banned_token_ids(processor),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            decoded = [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in new_tokens.tolist()]
            for i in range(len(batch_texts)):
                outputs.append(decoded[i * num_samples : (i + 1) * num_samples])
            progress.update(len(batch_texts) * num_samples)
    finally:
        tokenizer.padding_side = old_side
    return outputs


@dataclass
class Policy:
    """A loaded model + processor with the generation settings a stage uses; what methods
    receive instead of raw model objects."""

    model: object
    processor: object
    batch_size: int = 32

    def generate(self, prompts: list[list[dict]], images: list[list], **kwargs) -> list[list[str]]:
        kwargs.setdefault("batch_size", self.batch_size)
        return generate(self.model, self.processor, prompts, images, **kwargs)
