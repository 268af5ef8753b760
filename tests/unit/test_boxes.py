"""Box parsing, normalisation, the released crop rule and IoU (methods/boxes.py)."""

import pytest
from PIL import Image

from methods.boxes import (
    FALLBACK_BOX,
    box_to_pixels,
    crop,
    crop_region,
    format_box,
    iou,
    is_normalised,
    min_half_px,
    parse_box,
    resolve_box,
)


@pytest.mark.parametrize("text,expected", [
    ("[0.1, 0.2, 0.5, 0.6]", [0.1, 0.2, 0.5, 0.6]),
    ("(12, 30, 40, 60)", [12.0, 30.0, 40.0, 60.0]),
    ("The region is [.25,0.25, 0.75 ,0.75].", [0.25, 0.25, 0.75, 0.75]),
    ("x0=-3 y0=+4 x1=10.5 y1=20", [-3.0, 4.0, 10.5, 20.0]),
    ("[0.1, 0.2, 0.5, 0.6, 0.9]", [0.1, 0.2, 0.5, 0.6]),  # first four numbers
])
def test_parse_box(text, expected):
    assert parse_box(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["left", "red", "", None, "[0.1, 0.2, 0.5]", "[a, b, c, d]", "nan, inf, 1, 2"])
def test_malformed_text_gives_none(text):
    assert parse_box(text) is None


def test_malformed_text_falls_back_to_the_released_box():
    box, parsed = resolve_box("left", 64, 64)
    assert not parsed and box == [16.0, 16.0, 48.0, 48.0]
    assert FALLBACK_BOX == (0.25, 0.25, 0.75, 0.75)
    box, parsed = resolve_box("[0.1, 0.2, 0.5, 0.6]", 64, 64)
    assert parsed and box == pytest.approx([6.4, 12.8, 32.0, 38.4])


def test_normalised_vs_pixels_by_the_sum_rule():
    assert is_normalised([0.9, 0.9, 1.0, 1.0]) and is_normalised([1, 1, 1, 1.99])
    assert not is_normalised([1, 1, 1, 2]) and not is_normalised([12, 30, 40, 60])
    assert box_to_pixels([12, 30, 40, 60], 64, 64) == [12, 30, 40, 60]
    assert box_to_pixels([0.0, 0.5, 0.5, 1.0], 64, 64) == [0, 32, 32, 64]
    # The rule's known limit: a tiny pixel box (sum < 5) reads as normalised.
    assert box_to_pixels([0, 0, 1, 2], 64, 64) == [0, 0, 64, 64]


def test_normalised_coordinates_refer_to_the_padded_square():
    # 100 x 50 image padded to 100 x 100: 25 px of padding above; y = 0.5 is the image's middle row.
    assert box_to_pixels([0.0, 0.25, 1.0, 0.75], 100, 50) == [0, 0, 100, 50]
    assert box_to_pixels([0.1, 0.5, 0.2, 0.5], 100, 50) == pytest.approx([10, 25, 20, 25])
    text = format_box([10, 5, 60, 45], 100, 50)
    assert box_to_pixels(parse_box(text), 100, 50) == pytest.approx([10, 5, 60, 45], abs=0.6)


def test_inverted_corners_are_ordered():
    assert box_to_pixels([40, 60, 12, 30], 64, 64) == [12, 30, 40, 60]
    assert box_to_pixels([0.5, 0.5, 0.25, 0.25], 64, 64) == [16, 16, 32, 32]


def test_out_of_image_boxes_are_clipped():
    assert box_to_pixels([-10, -5, 30, 100], 64, 64) == [0, 0, 30, 64]
    # Entirely outside: a zero-area box on the nearest edge.
    assert box_to_pixels([70, 80, 90, 100], 64, 64) == [64, 64, 64, 64]


def test_crop_is_a_min_half_square_around_the_centre_inside_the_image():
    half = min_half_px(64, 64, 0.25)
    assert half == 16
    assert crop_region([28, 28, 36, 36], 64, 64, half) == (16, 16, 48, 48)  # small box: min_half
    assert crop_region([10, 10, 50, 30], 64, 64, half) == (10, 0, 50, 40)  # longer side 40 -> half 20
    assert crop_region([0, 0, 4, 4], 64, 64, half) == (0, 0, 32, 32)  # shifted in, not shrunk
    assert crop_region([60, 62, 64, 64], 64, 64, half) == (32, 32, 64, 64)
    assert crop_region([0, 0, 64, 64], 64, 64, half) == (0, 0, 64, 64)
    # Half-size larger than the image: the whole side.
    assert crop_region([30, 30, 34, 34], 64, 40, 24) == (8, 0, 56, 40)


def test_crop_of_degenerate_boxes():
    half = min_half_px(64, 64, 0.25)
    assert crop_region([64, 64, 64, 64], 64, 64, half) == (32, 32, 64, 64)  # a corner point
    assert crop_region([20, 10, 20, 50], 64, 64, half) == (0, 10, 40, 50)  # a vertical line
    image = Image.new("RGB", (64, 64))
    assert crop(image, [64, 64, 64, 64], 0.25).size == (32, 32)
    assert crop(image, resolve_box("no box here", 64, 64)[0], 0.25).size == (32, 32)


def test_released_scale_reproduces_168_px():
    assert min_half_px(336, 336, 0.5) == 168


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)
    # Degenerate boxes: zero-area box has IoU 0, two zero-area boxes too (no division by zero).
    assert iou([5, 5, 5, 5], [0, 0, 10, 10]) == 0.0
    assert iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0


def test_format_box_round_trips():
    text = format_box([16, 16, 48, 48], 64, 64)
    assert text == "[0.25, 0.25, 0.75, 0.75]"
    assert resolve_box(text, 64, 64) == ([16.0, 16.0, 48.0, 48.0], True)
