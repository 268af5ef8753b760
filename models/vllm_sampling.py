"""Sampling with vLLM (``generate.backend=vllm``): the same ``generate`` contract as
``models.sampling.Policy``, served by a vLLM engine over a full (merged) model directory.

Prompts are rendered with the model's own chat template (the HF processor's, as the HF path
does) and sent with their images as ``{"prompt": text, "multi_modal_data": {"image": [...]}}``;
vLLM expands each image placeholder itself. ``SamplingParams(n=k, ...)`` draws the k answers of
a prompt; with a seed, vLLM gives the i-th of them seed + i, so the k answers differ.

Departures from the HF path (so the two backends do not give identical texts for one seed):
- randomness comes from vLLM's per-request generators, not ``torch.manual_seed``; each
  prompt gets its own seed drawn from the call's seed;
- ``pixel_transform`` (SeVa's diffusion noise on the processed pixel tensor) cannot be
  applied: vLLM preprocesses images inside the engine. Image-level augmentations (crop, moco)
  work, since they edit the PIL image before it is sent.
- only ``generate`` exists: code that needs the HF model itself (log-probs, MPO's
  prefix continuation, judge_grpo's rated rollouts) still needs ``generate.backend=hf``.

vLLM is imported lazily: it is an optional GPU extra, and the CPU build machines lack it.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field

from models.load import ModelUnavailable
from models.progress import Progress
from models.sampling import banned_token_ids, prompt_texts

NEEDS_GPU_EXTRA = "generate.backend=vllm needs the gpu extra: pip install -e '.[gpu]' on a CUDA machine"
# vLLM clamps a logit bias to [-100, 100]; -100 makes a token's probability ~e^-100, i.e. never.
SUPPRESS = -100.0


class VLLMUnavailable(ModelUnavailable):
    """vLLM is not installed here; the message says how to get it."""


def require_vllm() -> None:
    """Fail with one message when vLLM is not importable (checked without importing it)."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailable(NEEDS_GPU_EXTRA)


@dataclass
class VLLMPolicy:
    """A vLLM engine over ``model_dir`` (config, weights and processor in one directory).

    The engine starts on the first ``generate`` call and lives as long as this object's
    process: run it in a process of its own to give the GPU memory back afterwards (vLLM has
    no reliable in-process shutdown)."""

    model_dir: str
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_images_per_prompt: int = 2
    _llm: object = field(default=None, init=False, repr=False)
    _processor: object = field(default=None, init=False, repr=False)

    @property
    def processor(self):
        """The HF processor: its chat template renders prompts exactly as training sees them."""
        if self._processor is None:
            from models.load import load_processor

            self._processor = load_processor(self.model_dir)
        return self._processor

    @property
    def model(self):
        # A ValueError, not AttributeError: a wrong option for this method, not retried.
        raise ValueError("generate.backend=vllm serves sampling only; this method's generate also needs the "
                         "HF model (log-probs or prefix continuation): run it with generate.backend=hf")

    def engine(self):
        if self._llm is None:
            require_vllm()
            from vllm import LLM

            self._llm = LLM(model=self.model_dir, dtype=self.dtype, gpu_memory_utilization=self.gpu_memory_utilization,
                            max_model_len=self.max_model_len,
                            limit_mm_per_prompt={"image": self.max_images_per_prompt})
        return self._llm

    def generate(
        self,
        prompts: list[list[dict]],
        images: list[list],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int | None = None,
        label: str = "generate",
        pixel_transform=None,
        batch_size: int | None = None,
        reseed_per_batch: bool = False,
    ) -> list[list[str]]:
        """``num_samples`` responses per prompt (one list of stripped strings per prompt);
        greedy when temperature == 0. ``batch_size`` and ``reseed_per_batch`` are accepted for
        the shared contract and ignored: vLLM schedules its own batches, and it already seeds
        every request from ``seed`` (the same seed gives each prompt the same request seed)."""
        if pixel_transform is not None:
            raise ValueError("generate.backend=vllm cannot apply a pixel-tensor transform (SeVa's diffusion "
                             "noise): use method.augmentations=[crop] or [moco], or generate.backend=hf")
        from vllm import SamplingParams

        progress = Progress(label, len(prompts) * num_samples, unit="samples")
        texts = prompt_texts(self.processor, prompts)
        bias = {token: SUPPRESS for token in banned_token_ids(self.processor)}
        # Greedy answers are all the same: ask for one and repeat it, as HF's greedy
        # num_return_sequences does.
        n = num_samples if temperature > 0 else 1
        rng = random.Random(seed)
        params = [
            SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                           max_tokens=max_new_tokens, seed=rng.getrandbits(31) if seed is not None else None,
                           logit_bias=bias or None, skip_special_tokens=True)
            for _ in texts
        ]
        requests = [{"prompt": text, "multi_modal_data": {"image": list(imgs)}} if imgs else {"prompt": text}
                    for text, imgs in zip(texts, images)]
        outputs = self.engine().generate(requests, params, use_tqdm=False)
        answers = []
        for out in outputs:  # vLLM returns outputs in request order
            drawn = [c.text.strip() for c in out.outputs]
            answers.append(drawn if n == num_samples else drawn * num_samples)
        progress.update(len(prompts) * num_samples)
        return answers
