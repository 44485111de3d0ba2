"""Visual parts of an image: the pooled vector plus the P most salient regions.

Owns image preprocessing (alpha on white, letterbox or stretch to the input size), the
saliency-region extractor behind the single entry point `extract_parts` (so a detector
can replace it later without touching callers) and the `PartsFeatures` container.
Candidates are cells and k x k average-pooled windows of the last feature map, ranked by
activation norm (docs/method.md#visual-parts).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from components.device import resolve_device
from components.vision.backbone import (
    NUM_FEATURES,
    EfficientNetLite0,
    load_backbone,
    normalize,
)
from components.vision.config import EXTRACTOR_VERSION, FEATURE_STRIDE, PartsConfig  # noqa: F401 (re-export)

log = logging.getLogger(__name__)

BACKGROUND_RGB = (255, 255, 255)


@dataclass
class PartsFeatures:
    """Parts of N images, row i belongs to `paths[i]`.

    Arrays (P = cfg.num_parts, k = cfg.logits_topk):
    - `pooled` (N,1280) float32: the whole feature map pooled (`cfg.pooling`: mean, the
      classifier's input, or GeM).
    - `parts` (N,P,1280) float32: region vectors, most salient first (descending L2 norm).
    - `boxes` (N,P,4) float32: x0, y0, x1, y1 of each region in pixels of the original image.
    - `windows` (N,P) int8: window side in cells (1 = one cell).
    - `mask` (N,P) bool: False where an image has fewer than P candidate regions; those
      rows are zero (vectors and boxes) and their top-k indices are -1.
    - `image_sizes` (N,2) int32: original width, height.
    - `topk_indices` / `topk_scores` (N,P+1,k) int16 / float32: ImageNet classes and
      softmax probabilities; slot 0 is the pooled vector, slot j >= 1 is part j-1.
    """

    paths: list[str]
    pooled: np.ndarray
    parts: np.ndarray
    boxes: np.ndarray
    windows: np.ndarray
    mask: np.ndarray
    image_sizes: np.ndarray
    topk_indices: np.ndarray
    topk_scores: np.ndarray

    ARRAYS = ("pooled", "parts", "boxes", "windows", "mask", "image_sizes", "topk_indices",
              "topk_scores")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_parts(self) -> int:
        return int(self.parts.shape[1])

    def take(self, index: Sequence[int] | np.ndarray) -> PartsFeatures:
        """Rows `index`, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return PartsFeatures(paths=[self.paths[i] for i in index],
                             **{name: getattr(self, name)[index] for name in self.ARRAYS})

    @classmethod
    def concat(cls, items: Sequence[PartsFeatures]) -> PartsFeatures:
        if not items:
            raise ValueError("nothing to concatenate")
        return cls(paths=[p for item in items for p in item.paths],
                   **{name: np.concatenate([getattr(item, name) for item in items])
                      for name in cls.ARRAYS})

    @classmethod
    def empty(cls, cfg: PartsConfig) -> PartsFeatures:
        p, k = cfg.num_parts, cfg.logits_topk
        return cls(paths=[], pooled=np.zeros((0, NUM_FEATURES), np.float32),
                   parts=np.zeros((0, p, NUM_FEATURES), np.float32),
                   boxes=np.zeros((0, p, 4), np.float32), windows=np.zeros((0, p), np.int8),
                   mask=np.zeros((0, p), bool), image_sizes=np.zeros((0, 2), np.int32),
                   topk_indices=np.zeros((0, p + 1, k), np.int16),
                   topk_scores=np.zeros((0, p + 1, k), np.float32))

    def save(self, path: Path) -> Path:
        """One uncompressed .npz (loads in milliseconds; features hardly compress)."""
        path = Path(path)
        np.savez(path, paths=np.asarray(self.paths, dtype=str),
                 **{name: getattr(self, name) for name in self.ARRAYS})
        return path

    @classmethod
    def load(cls, path: Path) -> PartsFeatures:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(paths=[str(p) for p in data["paths"]],
                       **{name: data[name] for name in cls.ARRAYS})

    def __eq__(self, other: object) -> bool:  # arrays make the dataclass default ambiguous
        if not isinstance(other, PartsFeatures):
            return NotImplemented
        return self.paths == other.paths and all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name))
            for f in fields(self) if f.name != "paths")


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _Prepared:
    pixels: np.ndarray  # (S,S,3) uint8, the letterboxed/stretched input
    size: tuple[int, int]  # original (width, height)
    content: tuple[float, float, float, float]  # x0, y0, x1, y1 of the image inside the input


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (clip art is drawn for a white page)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    page = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
    page.alpha_composite(rgba)
    return page.convert("RGB")


def prepare_image(path: str | Path, cfg: PartsConfig) -> _Prepared:
    """Decode one image and bring it to the backbone's square input (uint8, not normalised).

    EXIF orientation is ignored, like most vision pipelines: boxes refer to the stored
    pixel grid.
    """
    s = cfg.input_size
    with Image.open(path) as image:
        width, height = image.size
        if cfg.resize == "letterbox":
            scale = s / max(width, height)
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        else:
            new_w, new_h = s, s
        # JPEG only: decode at a reduced scale straight from the DCT (big photos, COCO).
        image.draft("RGB", (new_w, new_h))
        rgb = _to_rgb(image)
    if rgb.size != (new_w, new_h):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if (new_w, new_h) == (s, s):
        return _Prepared(np.array(rgb), (width, height), (0.0, 0.0, float(s), float(s)))
    canvas = Image.new("RGB", (s, s), BACKGROUND_RGB)
    x0, y0 = (s - new_w) // 2, (s - new_h) // 2
    canvas.paste(rgb, (x0, y0))
    return _Prepared(np.array(canvas), (width, height),
                     (float(x0), float(y0), float(x0 + new_w), float(y0 + new_h)))


# --------------------------------------------------------------------------- windows


@functools.lru_cache(maxsize=8)
def candidate_windows(grid: int, window_sizes: tuple[int, ...]) -> np.ndarray:
    """(M,3) rows of (row, col, side) in cells, in the order `_window_vectors` emits them."""
    rows = []
    for k in window_sizes:
        if k > grid:
            continue
        for r in range(grid - k + 1):
            for c in range(grid - k + 1):
                rows.append((r, c, k))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _window_vectors(fmap: torch.Tensor, window_sizes: tuple[int, ...]) -> torch.Tensor:
    """(B,C,h,w) -> (B,M,C): every k x k average-pooled window, row-major per size."""
    out = []
    for k in window_sizes:
        if k > min(fmap.shape[-2:]):
            continue
        pooled = fmap if k == 1 else F.avg_pool2d(fmap, kernel_size=k, stride=1)  # (B,C,h-k+1,w-k+1)
        out.append(pooled.flatten(2))  # (B,C,m_k)
    return torch.cat(out, dim=2).transpose(1, 2)  # (B,M,C)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with each of `boxes` (n,4)."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / np.maximum(_area(box) + _area(boxes) - inter, 1e-9)


def _select(norms: np.ndarray, valid: np.ndarray, boxes: np.ndarray, cfg: PartsConfig) -> np.ndarray:
    """Indices of up to P candidates of one image, by descending norm (ties: lower index)."""
    order = np.argsort(-norms, kind="stable")
    order = order[valid[order]]
    if cfg.max_overlap >= 1.0:
        return order[: cfg.num_parts]
    kept: list[int] = []
    for i in order:
        if kept and _iou(boxes[i], boxes[kept]).max() > cfg.max_overlap:
            continue
        kept.append(int(i))
        if len(kept) == cfg.num_parts:
            break
    return np.asarray(kept, dtype=np.int64)


def _parts_from_maps(fmap: torch.Tensor, classifier: torch.nn.Linear, prepared: list[_Prepared],
                     cfg: PartsConfig) -> dict[str, np.ndarray]:
    """Feature maps (B,1280,g,g) of one batch -> the PartsFeatures arrays of that batch."""
    b, p, k = fmap.shape[0], cfg.num_parts, cfg.logits_topk
    grid = fmap.shape[-1]
    mean_pooled = fmap.mean(dim=(2, 3))  # (B,1280), the classifier's input
    pooled = (mean_pooled if cfg.pooling == "mean"  # the map is post-ReLU6, so >= 0
              else fmap.float().clamp(min=1e-6).pow(cfg.gem_power).mean(dim=(2, 3)).pow(1.0 / cfg.gem_power))
    cand = _window_vectors(fmap, cfg.window_sizes)  # (B,M,1280)
    norms = cand.norm(dim=2).float().cpu().numpy()  # (B,M)

    wins = candidate_windows(grid, cfg.window_sizes)  # (M,3)
    cell = cfg.input_size / grid
    sq = np.stack([wins[:, 1] * cell, wins[:, 0] * cell,  # boxes in input-square pixels (M,4)
                   (wins[:, 1] + wins[:, 2]) * cell, (wins[:, 0] + wins[:, 2]) * cell], axis=1)

    chosen = np.zeros((b, p), np.int64)  # candidate index per slot (0 where masked)
    out_boxes = np.zeros((b, p, 4), np.float32)
    out_windows = np.zeros((b, p), np.int8)
    out_mask = np.zeros((b, p), bool)
    sizes = np.asarray([pr.size for pr in prepared], np.int32)
    for i, pr in enumerate(prepared):
        cx0, cy0, cx1, cy1 = pr.content
        inside_w = np.clip(np.minimum(sq[:, 2], cx1) - np.maximum(sq[:, 0], cx0), 0, None)
        inside_h = np.clip(np.minimum(sq[:, 3], cy1) - np.maximum(sq[:, 1], cy0), 0, None)
        share = inside_w * inside_h / ((sq[:, 2] - sq[:, 0]) * (sq[:, 3] - sq[:, 1]))
        # Square-input pixels -> original-image pixels, clipped to the image.
        w, h = pr.size
        sx, sy = w / (cx1 - cx0), h / (cy1 - cy0)
        img_boxes = np.stack([(sq[:, 0] - cx0) * sx, (sq[:, 1] - cy0) * sy,
                              (sq[:, 2] - cx0) * sx, (sq[:, 3] - cy0) * sy], axis=1)
        img_boxes = np.clip(img_boxes, 0, [w, h, w, h]).astype(np.float32)
        picked = _select(norms[i], share >= cfg.min_inside - 1e-9, img_boxes, cfg)
        n = len(picked)
        chosen[i, :n] = picked
        out_boxes[i, :n] = img_boxes[picked]
        out_windows[i, :n] = wins[picked, 2]
        out_mask[i, :n] = True

    # Gather only the kept windows on the device (not all M candidates to the host).
    index = torch.from_numpy(chosen).to(fmap.device)
    mask_t = torch.from_numpy(out_mask).to(fmap.device)
    parts_t = torch.gather(cand, 1, index[:, :, None].expand(-1, -1, cand.shape[2]))  # (B,P,1280)
    parts_t = parts_t * mask_t[:, :, None]
    out_parts = parts_t.float().cpu().numpy()

    if k:
        # The classifier is linear after pooling, so a window's logits are _fc(window mean).
        slots = torch.cat([mean_pooled[:, None, :], parts_t], dim=1)  # (B,P+1,1280)
        probs = classifier(slots.float()).softmax(dim=-1)  # (B,P+1,1000)
        top = probs.topk(k, dim=-1)
        topk_indices = top.indices.cpu().numpy().astype(np.int16)
        topk_scores = top.values.cpu().numpy().astype(np.float32)
        topk_indices[:, 1:][~out_mask] = -1
        topk_scores[:, 1:][~out_mask] = 0.0
    else:
        topk_indices = np.zeros((b, p + 1, 0), np.int16)
        topk_scores = np.zeros((b, p + 1, 0), np.float32)
    return {"pooled": pooled.float().cpu().numpy(), "parts": out_parts, "boxes": out_boxes,
            "windows": out_windows, "mask": out_mask, "image_sizes": sizes,
            "topk_indices": topk_indices, "topk_scores": topk_scores}


# --------------------------------------------------------------------------- backends

Backend = Literal["auto", "onnxruntime", "torch", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "onnxruntime", "torch", "eager")


def onnxruntime_available() -> bool:
    """ONNX Runtime needs both `onnxruntime` (to run) and `onnx` (for torch's exporter)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> onnxruntime on CPU when installed (fastest measured here), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if backend == "onnxruntime" and device.type != "cpu":
        raise ValueError("the onnxruntime backend runs on CPU only; use backend='torch' on GPU")
    return backend


class _TorchRunner:
    """uint8 pixels (B,S,S,3) -> feature maps (B,1280,g,g) with the PyTorch backbone.

    `torch`: batch norms folded into the convolutions and channels-last memory, measured
    about 3x the plain forward on 2 CPU cores. `eager`: the plain model, the baseline.
    """

    def __init__(self, device: torch.device, optimized: bool) -> None:
        self.device, self.optimized = device, optimized
        model = load_backbone(device, fold_bn=optimized)
        self.model = model.to(memory_format=torch.channels_last) if optimized else model
        self.classifier = self.model._fc

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # The permuted NHWC buffer already is a channels-last NCHW tensor: no copy.
        x = normalize(pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2))  # (B,3,S,S)
        if not self.optimized:
            x = x.contiguous()
        return self.model.features(x)


class _OnnxRunner:
    """The folded backbone exported to ONNX (in memory, ~0.3 s) and run by ONNX Runtime.

    On these 2 cores its depthwise convolutions are markedly faster than PyTorch's, and
    it keeps improving with batch size where PyTorch's CPU path degrades.
    """

    def __init__(self, input_size: int, threads: int) -> None:
        import onnxruntime as ort

        folded = load_backbone("cpu", fold_bn=True)
        self.classifier = folded._fc
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # tracer notes about the shape arithmetic of SAME padding
            warnings.simplefilter("ignore")
            kwargs = dict(input_names=["x"], output_names=["fmap"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "fmap": {0: "batch"}})
            sample = torch.zeros(1, 3, input_size, input_size)
            try:
                torch.onnx.export(_Features(folded), (sample,), buffer, dynamo=False, **kwargs)
            except TypeError:  # torch < 2.5 has no `dynamo` switch and uses this exporter
                torch.onnx.export(_Features(folded), (sample,), buffer, **kwargs)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads would spin and starve the decode thread on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buffer.getvalue(), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # Transpose while still uint8 (a quarter of the bytes), then normalise: NCHW for ONNX.
        x = normalize(pixels.permute(0, 3, 1, 2).contiguous())  # (B,3,S,S)
        fmap = self.session.run(None, {"x": x.numpy()})[0]
        return torch.from_numpy(fmap)  # (B,1280,g,g)


class _Features(torch.nn.Module):
    def __init__(self, model: EfficientNetLite0) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


@functools.lru_cache(maxsize=8)
def _runner(backend: str, device_str: str, input_size: int, threads: int) -> _TorchRunner | _OnnxRunner:
    """Loaded once per process and setting (weights load, fold and export take ~1 s)."""
    if backend == "onnxruntime":
        return _OnnxRunner(input_size, threads)
    return _TorchRunner(torch.device(device_str), optimized=backend == "torch")


def _get_runner(backend: str, device: torch.device, input_size: int) -> _TorchRunner | _OnnxRunner:
    resolved = resolve_backend(backend, device)
    threads = torch.get_num_threads()
    try:
        return _runner(resolved, str(device), input_size, threads)
    except Exception:
        if backend != "auto" or resolved != "onnxruntime":
            raise
        # An exporter change in a future torch must not stop a run that asked for "auto".
        log.warning("ONNX Runtime backend unavailable, falling back to torch", exc_info=True)
        return _runner("torch", str(device), input_size, threads)


def _batches(paths: Sequence[str | Path], cfg: PartsConfig, batch_size: int,
             workers: int) -> Iterator[list[_Prepared]]:
    """Decoded batches in order; decoding runs `workers` threads ahead of the model.

    PIL releases the GIL while it decodes and resizes, so threads overlap with the
    forward pass without the start-up and pickling cost of worker processes. The
    look-ahead is bounded (two batches) so memory stays flat on large datasets.
    """
    if workers <= 0:
        for start in range(0, len(paths), batch_size):
            yield [prepare_image(p, cfg) for p in paths[start:start + batch_size]]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        it = iter(paths)
        for path in it:
            pending.append(pool.submit(prepare_image, path, cfg))
            if len(pending) >= 2 * batch_size:
                break
        while pending:
            batch = []
            while pending and len(batch) < batch_size:
                batch.append(pending.popleft().result())
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(prepare_image, nxt, cfg))
            yield batch


def default_workers() -> int:
    """Decode threads: one on a 2-core box (the model wants the cores), more on bigger ones."""
    cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


@torch.inference_mode()
def extract_parts(image_paths: Sequence[str | Path], cfg: PartsConfig | None = None,
                  device: str | torch.device | None = None, batch_size: int = 32,
                  progress: bool = True, workers: int | None = None,
                  backend: Backend = "auto") -> PartsFeatures:
    """Pooled vector and the P most salient regions of each image (the one parts entry point).

    `device=None` uses CUDA when available. `workers` decode threads (None = default).
    `backend`: `auto` (onnxruntime on CPU if installed, else torch), `onnxruntime`,
    `torch` (folded, channels-last) or `eager` (the plain model, the benchmark baseline).
    Results depend on neither `batch_size` nor `backend` beyond float rounding (~1e-5).
    """
    cfg = cfg or PartsConfig()
    paths = [str(p) for p in image_paths]
    if not paths:
        return PartsFeatures.empty(cfg)
    dev = resolve_device(device)
    runner = _get_runner(backend, dev, cfg.input_size)
    workers = default_workers() if workers is None else workers
    chunks = []
    with tqdm(total=len(paths), desc="parts", unit="img", disable=not progress) as bar:
        for prepared in _batches(paths, cfg, batch_size, workers):
            pixels = torch.from_numpy(np.stack([pr.pixels for pr in prepared]))  # (B,S,S,3) uint8
            fmap = runner(pixels)  # (B,1280,g,g)
            chunks.append(_parts_from_maps(fmap, runner.classifier, prepared, cfg))
            bar.update(len(prepared))
    arrays = {name: np.concatenate([c[name] for c in chunks]) for name in PartsFeatures.ARRAYS}
    return PartsFeatures(paths=paths, **arrays)
