"""Image augmentations that make SeVa's rejected responses.

``DiffusionNoise`` follows SeVa's released code: it noises the *normalised pixel tensor*
(after the processor), with the sigmoid beta schedule

    betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5
    abar  = cumprod(1 - betas)
    x_t   = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,   eps ~ N(0, I)

t = 500 (13B) or 800 (7B) in the paper.
"""

from __future__ import annotations

import torch


def sigmoid_alpha_bar(num_steps: int = 1000, beta_start: float = 1e-5, beta_end: float = 5e-3) -> torch.Tensor:
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (beta_end - beta_start) + beta_start
    return torch.cumprod(1.0 - betas, dim=0)


class DiffusionNoise:
    def __init__(self, step: int, seed: int = 0, num_steps: int = 1000):
        if not 0 <= step < num_steps:
            raise ValueError(f"noise step {step} must be in [0, {num_steps})")
        self.step = step
        self.abar = float(sigmoid_alpha_bar(num_steps)[step])
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(pixel_values.shape, generator=self.generator, dtype=torch.float32)
        noised = self.abar**0.5 * pixel_values.float() + (1 - self.abar) ** 0.5 * noise
        return noised.to(pixel_values.dtype)
