"""Bounding boxes for visual chain of thought (UV-CoT, seeds/uv-cot.txt sec. 3; METHODS.md).

Pure functions, no model: parse a box from model text, map it to pixels, crop the region the
released code crops, and score a box against a ground-truth box by IoU.

Conventions: a box is ``[x0, y0, x1, y1]`` (floats). *Pixel* boxes are in the image's own
pixel coordinates (origin top-left, x to the right, y down). *Normalised* boxes are in
[0, 1], relative to the image padded to a square (LLaVA-1.5 pads images to a square before
its vision tower sees them, so the model's normalised coordinates refer to that square; for a
square image this is just the image).

Released rules (UV-CoT ``cropwithbbox``), kept here:
- coordinates whose sum is < 5 are normalised, otherwise pixels;
- a model text that yields no box falls back to ``FALLBACK_BOX`` = [0.25, 0.25, 0.75, 0.75];
- the crop is a square around the box centre with half-size
  ``max(half the longer box side, min_half)``, shifted to stay inside the image, then clipped.
Departures, both documented at the function: the released parser accepts only decimal
numbers (``\\d*\\.\\d+``) and requires exactly four; ``parse_box`` also accepts integers and takes
the first four numbers of the text. The released ``min_half`` is a fixed 168 px (LLaVA-1.5's
336-px input); here it is ``min_half_frac`` of the image's longer side so it scales with the
image (0.5 of 336 px reproduces 168 px).
"""

from __future__ import annotations

import math
import re

FALLBACK_BOX = (0.25, 0.25, 0.75, 0.75)  # normalised, the released fallback
NORMALISED_SUM_LIMIT = 5.0  # released rule: sum of coordinates < 5 -> normalised

# A signed decimal or integer not glued to a preceding letter/digit ("x0" is a name, not a 0).
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])[-+]?(?:\d+\.\d*|\.\d+|\d+)")


def parse_box(text: str | None) -> list[float] | None:
    """The first four numbers in ``text`` as ``[x0, y0, x1, y1]``, or None when there are fewer.

    Accepts "[0.1, 0.2, 0.5, 0.6]", "(12, 30, 40, 60)", "x0=3 y0=4 ..." alike (digits inside a
    name such as "x0" are not numbers); the numbers are
    returned as written (not yet normalised, ordered or clipped: see ``box_to_pixels``).
    Non-finite values never match the pattern."""
    if not text:
        return None
    numbers = _NUMBER.findall(text)
    if len(numbers) < 4:
        return None
    return [float(v) for v in numbers[:4]]


def is_normalised(coords: list[float]) -> bool:
    """The released rule: coordinates whose sum is below 5 are normalised."""
    return sum(coords) < NORMALISED_SUM_LIMIT


def box_to_pixels(coords: list[float], width: int, height: int) -> list[float]:
    """Pixel box inside the image from raw parsed coordinates.

    Normalised coordinates (sum < 5) are scaled by the padded square's side max(width, height)
    and shifted by the padding on the shorter axis (released code). Corners are then ordered
    (an inverted box [x1, y1, x0, y0] means the same region) and clipped into
    [0, width] x [0, height]; a box entirely outside the image becomes a zero-area box on the
    nearest edge, which ``crop_region`` still handles (its square has half-size >= min_half)."""
    x0, y0, x1, y1 = coords
    if is_normalised(coords):
        side = max(width, height)
        x0, y0, x1, y1 = x0 * side, y0 * side, x1 * side, y1 * side
        pad_x = (side - width) / 2
        pad_y = (side - height) / 2
        x0, x1, y0, y1 = x0 - pad_x, x1 - pad_x, y0 - pad_y, y1 - pad_y
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return [_clip(x0, width), _clip(y0, height), _clip(x1, width), _clip(y1, height)]


def _clip(v: float, limit: float) -> float:
    return min(max(v, 0.0), float(limit))


def resolve_box(text: str | None, width: int, height: int) -> tuple[list[float], bool]:
    """(pixel box, parsed) for a model's box text: the parsed box, or the released fallback
    box (``parsed`` False) when the text holds fewer than four numbers."""
    coords = parse_box(text)
    if coords is None:
        return box_to_pixels(list(FALLBACK_BOX), width, height), False
    return box_to_pixels(coords, width, height), True


def crop_region(box: list[float], width: int, height: int, min_half: float) -> tuple[int, int, int, int]:
    """The released crop: an integer square (left, top, right, bottom) around the box centre.

    half = ceil(max(longer box side / 2, min_half)); the square is shifted (not shrunk) to stay
    inside the image, so it is an exact 2*half square unless 2 * half exceeds an image side
    (then that side is the whole image). Zero-area boxes (a point or a line) are fine: the
    square is min_half around them."""
    x0, y0, x1, y1 = box
    half = math.ceil(max((x1 - x0) / 2, (y1 - y0) / 2, float(min_half)))
    left, right = _span((x0 + x1) / 2, half, width)
    top, bottom = _span((y0 + y1) / 2, half, height)
    return left, top, right, bottom


def _span(centre: float, half: int, limit: int) -> tuple[int, int]:
    side = min(2 * half, limit)
    start = min(max(math.floor(centre - half + 0.5), 0), limit - side)
    return start, start + side


def min_half_px(width: int, height: int, min_half_frac: float) -> float:
    """The crop's minimum half-size in pixels: a fraction of the image's longer side."""
    return min_half_frac * max(width, height)


def crop(image, box: list[float], min_half_frac: float):
    """The local-detail image for a pixel box (a PIL crop; the processor resizes it)."""
    width, height = image.size
    return image.crop(crop_region(box, width, height, min_half_px(width, height, min_half_frac)))


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (same coordinate frame); 0.0 when
    the union has zero area (two degenerate boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def format_box(box: list[float], width: int, height: int) -> str:
    """A pixel box as the normalised text a model is expected to emit, e.g. "[0.12, 0.30, 0.50, 0.62]"
    (inverse of ``box_to_pixels`` on the padded square, two decimals)."""
    side = max(width, height)
    pad_x, pad_y = (side - width) / 2, (side - height) / 2
    x0, y0, x1, y1 = box
    values = [(x0 + pad_x) / side, (y0 + pad_y) / side, (x1 + pad_x) / side, (y1 + pad_y) / side]
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"
