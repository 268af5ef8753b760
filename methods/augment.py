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


# --- Image-space augmentations (SeVa Table 1). Each takes a PIL image and a random.Random
# and returns a new PIL image; ``strength`` in [0, 1] scales how far it moves the image.


def horizontal_flip(image, rng, strength: float = 1.0):
    from PIL import ImageOps

    return ImageOps.mirror(image)


def random_resized_crop(image, rng, strength: float = 0.5):
    """Crop a random area fraction in [1 - strength * 0.92, 1] (0.08 at full strength, as
    torchvision's default) with aspect ratio in [3/4, 4/3], resized back to the input size."""
    w, h = image.size
    min_area = 1.0 - strength * 0.92
    for _ in range(10):
        area = rng.uniform(min_area, 1.0) * w * h
        ratio = rng.uniform(3 / 4, 4 / 3)
        cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h))
    return image.copy()


def moco_style(image, rng, strength: float = 0.5):
    """MoCo v2's composition: random resized crop, colour jitter (p=0.8), grayscale (p=0.2),
    Gaussian blur (p=0.5), horizontal flip (p=0.5); jitter and blur scale with strength."""
    from PIL import ImageEnhance, ImageFilter, ImageOps

    out = random_resized_crop(image, rng, strength)
    if rng.random() < 0.8:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            out = enhancer(out).enhance(1.0 + rng.uniform(-0.4, 0.4) * strength * 2)
    if rng.random() < 0.2:
        out = ImageOps.grayscale(out).convert("RGB")
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0) * strength))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    return out


def erase(image, rng, strength: float = 1.0):
    """Paint the whole image in its background colour (the top-left pixel's): the question
    stays, the visual evidence goes, so the answer is the policy's blind guess. The limit of
    SeVa's strongest noise (no signal left) without its out-of-distribution pixels; not one of
    the paper's augmentations (README: SeVa probes)."""
    from PIL import Image

    return Image.new(image.mode, image.size, image.getpixel((0, 0)))


def hue_rotation(image, rng, strength: float = 0.5):
    """Rotate every pixel's hue by strength x 180 degrees, clockwise or anticlockwise at random;
    grey pixels (saturation 0) stay. Unlike noise, it keeps the evidence and changes what it
    says: at strength 2/3 a red object turns green or blue, so the policy's answer on the
    rotated image is a *different* colour for each image, not one blind guess for the whole
    question type (README: seva_hue_tuning). Not one of the paper's augmentations; the colour
    jitter in MoCo v2's (hue up to +-0.1 of the circle) is its weak form."""
    from PIL import Image

    shift = round(rng.choice((-1, 1)) * strength * 128)  # PIL's hue runs over 0..255
    h, s, v = image.convert("HSV").split()
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert(image.mode)


IMAGE_AUGMENTATIONS = {
    "flip": horizontal_flip, "crop": random_resized_crop, "moco": moco_style, "erase": erase, "hue": hue_rotation,
}
AUGMENTATIONS = ("diffusion", *IMAGE_AUGMENTATIONS)
