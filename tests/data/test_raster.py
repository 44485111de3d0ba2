"""Rasterisation: an SVG to a PNG on a white square, through the cache; failures and blank
renders remembered, cairosvg behind rsvg-convert, timeouts as errors, the cache key.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from svg_fixtures import write_svg

from components.data import raster

IMAGE_SIZE = 64




def test_rasterise_fits_on_a_white_square(tmp_path):
    svg = write_svg(tmp_path, "wide.svg", "Wide", colour="#ff0000", width=200, height=50)
    outcome = raster.rasterise_svg(svg, "k1", tmp_path / "cache", IMAGE_SIZE, 20)
    assert outcome.status == "ok" and not outcome.cached
    image = Image.open(outcome.png_path).convert("RGB")
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert image.getpixel((IMAGE_SIZE // 2, 2)) == (255, 255, 255)  # padding above the wide image
    red, green, blue = image.getpixel((IMAGE_SIZE // 2, IMAGE_SIZE // 2))
    assert red > 200 and green < 60 and blue < 60  # the drawing, centred


def test_blank_render_is_skipped_and_remembered(tmp_path, counting_renderer):
    svg = write_svg(tmp_path, "blank.svg", "Blank", blank=True)
    first = raster.rasterise_svg(svg, "k2", tmp_path / "cache", IMAGE_SIZE, 20)
    second = raster.rasterise_svg(svg, "k2", tmp_path / "cache", IMAGE_SIZE, 20)
    assert (first.status, first.cached, second.status, second.cached) == (
        "blank",
        False,
        "blank",
        True,
    )
    assert len(counting_renderer) == 1


def test_failure_is_cached_and_not_retried(tmp_path, monkeypatch):
    svg = write_svg(tmp_path, "x.svg", "X")
    calls = []

    def failing(svg_path, image_size, timeout_s):
        calls.append(svg_path)
        raise raster.RenderError("boom")

    monkeypatch.setattr(raster, "render_svg", failing)
    first = raster.rasterise_svg(svg, "k3", tmp_path / "cache", IMAGE_SIZE, 20)
    second = raster.rasterise_svg(svg, "k3", tmp_path / "cache", IMAGE_SIZE, 20)
    assert (first.status, second.status, second.cached) == ("failed", "failed", True)
    assert len(calls) == 1
    assert json.loads((tmp_path / "cache" / "k3.skip.json").read_text())["detail"] == "boom"


def test_cairosvg_is_the_fallback_when_rsvg_fails(tmp_path, monkeypatch):
    svg = write_svg(tmp_path, "x.svg", "X", width=40, height=80)

    def broken_rsvg(*args):
        raise raster.RenderError("rsvg-convert exit 1")

    monkeypatch.setattr(raster, "render_with_rsvg", broken_rsvg)
    png, renderer = raster.render_svg(svg, IMAGE_SIZE, 30)
    assert renderer == "cairosvg"
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (IMAGE_SIZE // 2, IMAGE_SIZE)  # aspect kept, fits the square


def test_renderer_timeout_is_a_render_error(tmp_path):
    svg = write_svg(tmp_path, "x.svg", "X")
    with pytest.raises(raster.RenderError, match="timed out"):
        raster.render_with_cairosvg(svg, IMAGE_SIZE, 0.001)


def test_cache_key_changes_with_content_size_and_renderer():
    base = raster.raster_cache_key("a" * 64, 224, "v1")
    assert base == raster.raster_cache_key("a" * 64, 224, "v1")
    assert (
        len(
            {
                base,
                raster.raster_cache_key("b" * 64, 224, "v1"),
                raster.raster_cache_key("a" * 64, 96, "v1"),
                raster.raster_cache_key("a" * 64, 224, "v2"),
            }
        )
        == 4
    )
