"""An ad's image, from the file an advertiser sends to the bytes /image answers: stored under
the suffix of its detected format (never the name it came with), and found only under its
root (the dataset directory for `file:` refs, the catalogue cache for `run:` refs)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from components.catalogue.images import image_name

SCRIPT = "<script>alert(document.cookie)</script>"


def png_with_script(path: Path) -> Path:
    """A real PNG (Pillow reads it) that is also an HTML page to a browser that sniffs."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"<html><body>{SCRIPT}</body></html>")
    Image.new("RGB", (40, 40), "red").save(path, format="PNG", pnginfo=info)
    return path


def test_an_added_image_is_stored_under_its_detected_format_not_its_name(tmp_path):
    page = png_with_script(tmp_path / "x.html")
    assert SCRIPT.encode() in page.read_bytes()
    assert image_name(page).endswith(".png")
    jpeg = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), "blue").save(jpeg, format="JPEG")
    assert image_name(jpeg).endswith(".jpg")
    webp = tmp_path / "photo"
    Image.new("RGB", (40, 40), "green").save(webp, format="WEBP")
    assert image_name(webp).endswith(".webp")
    # The same bytes under another name: the same stored name.
    (tmp_path / "y.png").write_bytes(page.read_bytes())
    assert image_name(tmp_path / "y.png") == image_name(page)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_an_image_of_another_format_has_no_stored_name(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="PNG, JPEG or WebP"):
        image_name(path)
