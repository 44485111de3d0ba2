"""The vision component: strict backbone load, parts extraction, its cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pydantic import ValidationError

from components.vision import backbone as bb
from components.vision import cache as cache_module
from components.vision import parts as parts_module
from components.vision.cache import extract_parts_cached
from components.vision.parts import PartsConfig, PartsFeatures, extract_parts, prepare_image

# A 3x3 feature map keeps every forward cheap; 9 cells + 4 2x2 windows + 1 3x3 window.
SMALL = PartsConfig(input_size=96, num_parts=4, logits_topk=3)


@pytest.fixture(scope="module")
def model() -> bb.EfficientNetLite0:
    return bb.load_backbone("cpu")


def _draw(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A few coloured shapes on a background: distinct, deterministic test images."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, size[0] - 8)), int(rng.integers(0, size[1] - 8))
        x1, y1 = x0 + int(rng.integers(6, size[0] // 2 + 8)), y0 + int(rng.integers(6, size[1] // 2 + 8))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image.convert(mode).save(path)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    return [
        _draw(tmp_path / "square.png", (80, 80), 0),
        _draw(tmp_path / "wide.png", (150, 50), 1),  # letterboxed: some windows on padding
        _draw(tmp_path / "tall.jpg", (40, 90), 2),
        _draw(tmp_path / "grey.png", (64, 64), 3, mode="L"),
    ]


# ----------------------------------------------------------------------------- backbone


def test_backbone_loads_strictly_with_the_shipped_weights(model):
    state = model.state_dict()
    assert len(state) == bb.NUM_WEIGHT_TENSORS == 296
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(name.startswith(("_conv_stem", "_bn0", "_blocks.", "_conv_head", "_bn1", "_fc"))
               for name in state)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_backbone_rejects_a_checkpoint_with_missing_or_extra_tensors(tmp_path):
    state = torch.load(bb.weights_path(), map_location="cpu", weights_only=True)
    broken = dict(state)
    broken.pop("_blocks.3._bn1.running_var")
    broken["_blocks.3._bn1.extra"] = torch.zeros(1)  # same count, wrong names
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        bb.load_backbone("cpu", path=tmp_path / "broken.pth")
    del broken["_blocks.3._bn1.extra"]
    torch.save(broken, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="296"):
        bb.load_backbone("cpu", path=tmp_path / "short.pth")


def test_features_shape_logits_and_folded_copy_agree(model, tmp_path):
    pixels = torch.stack([
        torch.from_numpy(prepare_image(_draw(tmp_path / f"{i}.png", (224, 224), i),
                                       PartsConfig()).pixels).permute(2, 0, 1)
        for i in range(4)])
    x = bb.normalize(pixels)  # (4,3,224,224)
    with torch.inference_mode():
        fmap = model.features(x)
        logits = model(x)
        folded = bb.fold_batchnorm(model).to(memory_format=torch.channels_last)
        fmap_folded = folded.features(x.contiguous(memory_format=torch.channels_last))
    assert fmap.shape == (4, 1280, 7, 7)
    assert float(fmap.min()) >= 0.0 and float(fmap.max()) <= 6.0  # post-ReLU6
    # The classifier is linear after pooling: logits = _fc(mean of the map).
    torch.testing.assert_close(logits, model._fc(fmap.mean(dim=(2, 3))), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fmap_folded, fmap, atol=1e-3, rtol=1e-3)
    # Different pictures, different predictions: the weights are really in place.
    assert len(set(logits.argmax(dim=1).tolist())) > 1
    assert float(logits.softmax(dim=1).max(dim=1).values.mean()) > 0.05


# ----------------------------------------------------------------------------- parts


def test_extract_parts_shapes_and_ranges(images):
    feats = extract_parts(images, SMALL, device="cpu", progress=False)
    n, p, k = len(images), SMALL.num_parts, SMALL.logits_topk
    assert len(feats) == n and feats.paths == [str(i) for i in images]
    assert feats.pooled.shape == (n, 1280) and feats.pooled.dtype == np.float32
    assert feats.parts.shape == (n, p, 1280)
    assert feats.boxes.shape == (n, p, 4)
    assert feats.windows.shape == feats.mask.shape == (n, p)
    assert feats.topk_indices.shape == feats.topk_scores.shape == (n, p + 1, k)
    assert feats.image_sizes.tolist() == [[80, 80], [150, 50], [40, 90], [64, 64]]
    assert feats.mask.all()
    assert np.isfinite(feats.parts).all() and (feats.parts >= 0).all()
    scores = feats.topk_scores
    assert ((scores > 0) & (scores <= 1)).all() and (np.diff(scores, axis=2) <= 0).all()


def test_gem_pooling_changes_only_the_pooled_vector(images, model):
    mean = extract_parts(images, SMALL, device="cpu", progress=False)
    gem_cfg = SMALL.model_copy(update={"pooling": "gem"})
    gem = extract_parts(images, gem_cfg, device="cpu", progress=False)

    # The power-mean inequality: GeM (p = 3) of a non-negative map is at least its mean, and
    # equals the map's own cube-mean root.
    assert (gem.pooled >= mean.pooled - 1e-5).all() and (gem.pooled > mean.pooled + 1e-3).any()
    pixels = torch.from_numpy(np.stack([prepare_image(i, SMALL).pixels for i in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        fmap = model.features(bb.normalize(pixels))
    expected = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3).numpy()
    np.testing.assert_allclose(gem.pooled, expected, rtol=1e-3, atol=1e-4)
    # Parts, boxes and the ImageNet top-k (the classifier reads the mean) are untouched.
    for name in ("parts", "boxes", "mask", "topk_indices"):
        np.testing.assert_array_equal(getattr(gem, name), getattr(mean, name))
    # Caches: mean keeps the token every earlier cache was written under; GeM gets its own.
    assert "pooling" not in SMALL.cache_token() and gem_cfg.cache_token() != SMALL.cache_token()


def test_parts_are_ranked_by_norm_and_the_first_is_the_most_salient_window(images, model):
    cfg = PartsConfig(input_size=96, num_parts=14, logits_topk=0, resize="stretch")
    feats = extract_parts(images[:1], cfg, device="cpu", progress=False)
    norms = np.linalg.norm(feats.parts[0], axis=1)
    assert (np.diff(norms) <= 1e-5).all()
    # Hand check against the plain backbone: the best cell/window by norm comes first.
    x = bb.normalize(torch.from_numpy(prepare_image(images[0], cfg).pixels).permute(2, 0, 1)[None])
    with torch.inference_mode():
        fmap = model.features(x)[0]  # (1280,3,3)
    candidates = [fmap[:, r, c] for r in range(3) for c in range(3)]
    candidates += [fmap[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in range(2) for c in range(2)]
    candidates.append(fmap.mean(dim=(1, 2)))
    expected = sorted((float(v.norm()) for v in candidates), reverse=True)
    np.testing.assert_allclose(norms, expected, rtol=1e-3)


def test_boxes_lie_inside_the_image(images):
    feats = extract_parts(images, SMALL, device="cpu", progress=False, workers=0)
    for boxes, mask, (w, h) in zip(feats.boxes, feats.mask, feats.image_sizes, strict=True):
        b = boxes[mask]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def test_wide_image_windows_on_padding_are_dropped_and_masked(images):
    # 150x50 letterboxed into 96x96 fills the middle row of cells (y 32..64). On the image:
    # the 3 middle cells (all of their area) and the four 2x2 windows (half of theirs);
    # the 3x3 window has only a third on the image, the top and bottom cells none.
    cfg = PartsConfig(input_size=96, num_parts=9, logits_topk=2)
    feats = extract_parts([images[1]], cfg, device="cpu", progress=False)
    assert feats.mask[0].tolist() == [True] * 7 + [False] * 2
    assert sorted(feats.windows[0, :7].tolist()) == [1, 1, 1, 2, 2, 2, 2]
    assert (feats.parts[0, 7:] == 0).all() and (feats.boxes[0, 7:] == 0).all()
    assert (feats.topk_indices[0, 8:] == -1).all() and (feats.topk_indices[0, :8] >= 0).all()
    # Every kept window spans the full height of the original image once clipped.
    np.testing.assert_allclose(feats.boxes[0, :7, 1], 0.0)
    np.testing.assert_allclose(feats.boxes[0, :7, 3], 50.0)
    assert feats.boxes[0, :7, 0].min() == 0.0 and feats.boxes[0, :7, 2].max() == 150.0


def test_overlap_suppression_keeps_disjoint_regions(images):
    cfg = PartsConfig(input_size=96, num_parts=6, max_overlap=0.01, logits_topk=0)
    feats = extract_parts(images[:1], cfg, device="cpu", progress=False)
    boxes = feats.boxes[0][feats.mask[0]]
    assert len(boxes) >= 2
    for i in range(len(boxes)):
        for j in range(i):
            overlap_w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            overlap_h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            assert overlap_w <= 0 or overlap_h <= 0


def test_extraction_is_deterministic_and_batch_size_independent(images):
    first = extract_parts(images, SMALL, device="cpu", progress=False, batch_size=4)
    again = extract_parts(images, SMALL, device="cpu", progress=False, batch_size=4)
    assert first == again  # bit-identical
    single = extract_parts(images, SMALL, device="cpu", progress=False, batch_size=1, workers=0)
    np.testing.assert_allclose(single.pooled, first.pooled, atol=1e-4)
    np.testing.assert_allclose(single.parts, first.parts, atol=1e-4)
    np.testing.assert_array_equal(single.boxes, first.boxes)
    np.testing.assert_array_equal(single.topk_indices[..., 0], first.topk_indices[..., 0])


@pytest.mark.parametrize("backend", ["eager", "torch", "onnxruntime"])
def test_backends_agree_and_pooled_top1_is_the_classifier_top1(images, model, backend):
    if backend == "onnxruntime" and not parts_module.onnxruntime_available():
        pytest.skip("onnxruntime/onnx not installed")
    feats = extract_parts(images[:2], SMALL, device="cpu", progress=False, backend=backend)
    x = bb.normalize(torch.stack([torch.from_numpy(prepare_image(p, SMALL).pixels).permute(2, 0, 1)
                                  for p in images[:2]]))
    with torch.inference_mode():
        fmap = model.features(x)  # the plain model is the reference
        top1 = model(x).argmax(dim=1).numpy()
    np.testing.assert_allclose(feats.pooled, fmap.mean(dim=(2, 3)).numpy(), atol=1e-4)
    np.testing.assert_array_equal(feats.topk_indices[:, 0, 0], top1)


def test_unknown_backend_is_rejected(images):
    with pytest.raises(ValueError, match="backend"):
        extract_parts(images[:1], SMALL, device="cpu", progress=False, backend="tpu")


def test_alpha_is_composited_on_white(tmp_path):
    transparent = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # invisible red
    ImageDraw.Draw(transparent).rectangle((16, 16, 47, 47), fill=(0, 0, 255, 255))
    transparent.save(tmp_path / "alpha.png")
    opaque = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(opaque).rectangle((16, 16, 47, 47), fill=(0, 0, 255))
    opaque.save(tmp_path / "white.png")
    la = Image.new("LA", (64, 64), (0, 0))  # grey + alpha, fully transparent
    la.save(tmp_path / "la.png")
    cfg = PartsConfig(input_size=64)
    assert (prepare_image(tmp_path / "la.png", cfg).pixels == 255).all()
    np.testing.assert_array_equal(prepare_image(tmp_path / "alpha.png", cfg).pixels,
                                  prepare_image(tmp_path / "white.png", cfg).pixels)
    feats = extract_parts([tmp_path / "alpha.png", tmp_path / "white.png"], cfg, device="cpu",
                          progress=False)
    np.testing.assert_array_equal(feats.pooled[0], feats.pooled[1])


def test_config_validation_and_round_trip(images, tmp_path):
    with pytest.raises(ValidationError):
        PartsConfig(input_size=100)
    with pytest.raises(ValidationError):
        PartsConfig(window_sizes=(1, 1))
    with pytest.raises(ValidationError):
        PartsConfig(input_size=64, window_sizes=(3,))  # a 2x2 map has no 3x3 window
    assert PartsConfig(input_size=320, num_parts=16).grid_size == 10
    feats = extract_parts(images[:2], SMALL, device="cpu", progress=False)
    assert PartsFeatures.load(feats.save(tmp_path / "feats.npz")) == feats
    assert feats.take([1, 0]).paths == feats.paths[::-1]
    assert len(PartsFeatures.concat([feats, feats])) == 4
    assert len(extract_parts([], SMALL, progress=False)) == 0


# ----------------------------------------------------------------------------- cache


def test_cache_reuses_results_and_recomputes_only_a_changed_image(images, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    real = parts_module.extract_parts
    computed: list[str] = []

    def counting(paths, *args, **kwargs):
        computed.extend(str(p) for p in paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(parts_module, "extract_parts", counting)
    first = extract_parts_cached(images, SMALL, cache_dir, device="cpu", progress=False,
                                 shard_size=3)
    assert computed == [str(p) for p in images]
    assert len(list(cache_module.config_dir(cache_dir, SMALL).glob("shard-*.npz"))) == 2
    np.testing.assert_allclose(first.parts, real(images, SMALL, "cpu", progress=False).parts,
                               atol=1e-4)

    def failing(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(parts_module, "extract_parts", failing)
    second = extract_parts_cached(images, SMALL, cache_dir, device="cpu", progress=False)
    assert second == first

    # Same bytes under another path: a hit. Rows follow the caller's order.
    copy = tmp_path / "copy.png"
    copy.write_bytes(images[0].read_bytes())
    reordered = extract_parts_cached([copy, images[2]], SMALL, cache_dir, progress=False)
    np.testing.assert_array_equal(reordered.parts, first.parts[[0, 2]])

    # One image changes: only it is computed again.
    monkeypatch.setattr(parts_module, "extract_parts", counting)
    computed.clear()
    _draw(images[1], (150, 50), seed=99)
    third = extract_parts_cached(images, SMALL, cache_dir, device="cpu", progress=False)
    assert computed == [str(images[1])]
    np.testing.assert_array_equal(third.parts[[0, 2, 3]], first.parts[[0, 2, 3]])
    assert not np.array_equal(third.parts[1], first.parts[1])

    # Another config lives in its own directory and computes everything.
    computed.clear()
    extract_parts_cached(images[:1], PartsConfig(input_size=64, num_parts=2), cache_dir,
                         progress=False)
    assert computed == [str(images[0])]


def test_cache_computes_duplicates_once_and_skips_a_damaged_shard(images, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    twin = tmp_path / "twin.png"
    twin.write_bytes(images[0].read_bytes())
    real = parts_module.extract_parts
    computed: list[str] = []

    def counting(paths, *args, **kwargs):
        computed.extend(str(p) for p in paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(parts_module, "extract_parts", counting)
    feats = extract_parts_cached([images[0], twin], SMALL, cache_dir, progress=False)
    assert computed == [str(images[0])]
    np.testing.assert_array_equal(feats.parts[0], feats.parts[1])
    assert feats.paths == [str(images[0]), str(twin)]

    for shard in cache_module.config_dir(cache_dir, SMALL).glob("shard-*.npz"):
        shard.write_bytes(b"not a zip file")
    computed.clear()
    again = extract_parts_cached([images[0]], SMALL, cache_dir, progress=False)
    assert computed == [str(images[0])]
    np.testing.assert_allclose(again.parts[0], feats.parts[0], atol=1e-6)
