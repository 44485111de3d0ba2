"""Rasterisation: an SVG file to a square PNG on white, through a content-addressed cache.

This module owns the renderer chain (rsvg-convert, cairosvg as the fallback, each in a
subprocess bounded by a timeout), the fit on a white square, the blank test, and the cache:
`<key>.png` for a usable image, `<key>.skip.json` for a failure or a blank render, so neither
is rendered twice. The key (`raster_cache_key`) names the SVG's bytes, the size and the
renderer versions. Which SVGs to rasterise is the source's business (openclipart.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from components.outputs import atomic_write

log = logging.getLogger(__name__)

RASTER_CACHE_SUBDIR = "raster"
# Bump when the PNG post-processing (fit, padding, blank test) changes: it is part of the cache key.
_FIT_VERSION = "fit-on-white-1"


class RenderError(RuntimeError):
    """No renderer produced a PNG for an SVG (failure or timeout)."""


@dataclass(frozen=True)
class RasterOutcome:
    """What happened to one SVG in the raster step."""

    status: str  # "ok" | "failed" | "blank"
    cached: bool  # answered from the cache without rendering
    png_path: Path | None  # cached PNG when status == "ok"
    renderer: str = ""  # "rsvg-convert" | "cairosvg" for fresh renders
    detail: str = ""


@functools.cache
def renderer_version() -> str:
    """The renderer chain's versions; part of the cache key, so an upgrade re-renders."""
    rsvg = "none"
    if shutil.which("rsvg-convert"):
        try:
            out = subprocess.run(
                ["rsvg-convert", "--version"], capture_output=True, text=True, timeout=10
            )
            rsvg = out.stdout.strip().rsplit(" ", 1)[-1] or "unknown"
        except (OSError, subprocess.SubprocessError):
            rsvg = "unknown"
    try:
        from importlib.metadata import version

        cairo = version("cairosvg")
    except Exception:  # not installed: the fallback fails per file and is counted
        cairo = "none"
    return f"rsvg-convert {rsvg}; cairosvg {cairo}; {_FIT_VERSION}"


def raster_cache_key(svg_sha256: str, image_size: int, version: str) -> str:
    """sha256 over the SVG's bytes hash, the output size and the renderer version."""
    return hashlib.sha256(f"{svg_sha256}\n{image_size}\n{version}".encode()).hexdigest()


def render_with_rsvg(svg_path: Path, image_size: int, timeout_s: float) -> bytes:
    """PNG bytes that fit in image_size x image_size, aspect kept, on white."""
    if not shutil.which("rsvg-convert"):
        raise RenderError("rsvg-convert not installed (apt-get install -y librsvg2-bin)")
    size = str(image_size)
    cmd = ["rsvg-convert", "-a", "-w", size, "-h", size, "-b", "white", "-f", "png", str(svg_path)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"rsvg-convert timed out after {timeout_s} s") from exc
    if out.returncode != 0 or not out.stdout:
        raise RenderError(
            f"rsvg-convert exit {out.returncode}: {out.stderr.decode(errors='replace').strip()[:200]}"
        )
    return out.stdout


# Runs in a child interpreter so a slow file can be killed at the timeout.
_CAIROSVG_SCRIPT = """
import io, sys
import cairosvg
from PIL import Image
path, size = sys.argv[1], int(sys.argv[2])
png = cairosvg.svg2png(url=path, output_width=size, background_color="white")
if Image.open(io.BytesIO(png)).size[1] > size:
    png = cairosvg.svg2png(url=path, output_height=size, background_color="white")
sys.stdout.buffer.write(png)
"""


def render_with_cairosvg(svg_path: Path, image_size: int, timeout_s: float) -> bytes:
    """The fallback renderer, in a subprocess bounded by `timeout_s`."""
    cmd = [sys.executable, "-c", _CAIROSVG_SCRIPT, str(svg_path), str(image_size)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"cairosvg timed out after {timeout_s} s") from exc
    if out.returncode != 0 or not out.stdout:
        last = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise RenderError(f"cairosvg exit {out.returncode}: {last[0][:200]}")
    return out.stdout


def render_svg(svg_path: Path, image_size: int, timeout_s: float) -> tuple[bytes, str]:
    """PNG bytes from rsvg-convert, or from cairosvg when rsvg-convert fails; and which one."""
    try:
        return render_with_rsvg(svg_path, image_size, timeout_s), "rsvg-convert"
    except RenderError as first:
        try:
            return render_with_cairosvg(svg_path, image_size, timeout_s), "cairosvg"
        except RenderError as second:
            raise RenderError(f"{first}; {second}") from second


def fit_on_white(png: bytes, image_size: int) -> Image.Image:
    """The render flattened on white, shrunk to fit if needed, centred on a square canvas."""
    with Image.open(io.BytesIO(png)) as raw:
        raw.load()
        image = raw.convert("RGBA")
    flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
    flat.alpha_composite(image)
    flat = flat.convert("RGB")
    if max(flat.size) > image_size:
        flat.thumbnail((image_size, image_size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    canvas.paste(flat, ((image_size - flat.width) // 2, (image_size - flat.height) // 2))
    return canvas


def is_blank(image: Image.Image) -> bool:
    """True when every pixel has the same colour (all white, or one flat colour)."""
    return all(low == high for low, high in image.getextrema())


def _skip_marker(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.skip.json"


def rasterise_svg(
    svg_path: Path, key: str, cache_dir: Path, image_size: int, timeout_s: float
) -> RasterOutcome:
    """One SVG to a cached PNG; failures and blank renders leave a small marker instead."""
    png_path = cache_dir / f"{key}.png"
    marker = _skip_marker(cache_dir, key)
    if png_path.is_file():
        return RasterOutcome(status="ok", cached=True, png_path=png_path)
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            return RasterOutcome(
                status=info["status"], cached=True, png_path=None, detail=info.get("detail", "")
            )
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable raster cache marker %s", marker)
    try:
        png, renderer = render_svg(svg_path, image_size, timeout_s)
        image = fit_on_white(png, image_size)
    except (RenderError, OSError, ValueError, Image.DecompressionBombError) as exc:
        atomic_write(marker, json.dumps({"status": "failed", "detail": str(exc)}).encode())
        return RasterOutcome(status="failed", cached=False, png_path=None, detail=str(exc))
    if is_blank(image):
        atomic_write(marker, json.dumps({"status": "blank", "renderer": renderer}).encode())
        return RasterOutcome(status="blank", cached=False, png_path=None, renderer=renderer)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(png_path, buffer.getvalue())
    return RasterOutcome(status="ok", cached=False, png_path=png_path, renderer=renderer)


def rasterise_svgs(
    jobs: Mapping[str, Path], cache_dir: Path, image_size: int, timeout_s: float, workers: int
) -> dict[str, RasterOutcome]:
    """Rasterise {cache key: svg path} concurrently (each render is its own subprocess, so
    threads suffice), with a progress bar on a terminal. Returns {cache key: outcome}."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, RasterOutcome] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {
            pool.submit(rasterise_svg, path, key, cache_dir, image_size, timeout_s): key
            for key, path in jobs.items()
        }
        for future in tqdm(
            as_completed(futures), total=len(futures), desc="rasterise", unit="svg", disable=None
        ):
            outcomes[futures[future]] = future.result()
    return outcomes
