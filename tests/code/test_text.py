"""The MiniLM encoder (offline weights) and the content-word vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from components.text.vocabulary import Vocabulary, build_vocabulary, content_words, tokenize


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from components.text.encoder import TextEncoder

    return TextEncoder(device="cpu", cache_dir=tmp_path_factory.mktemp("text-cache"))


def test_embeddings_are_normalised_deterministic_and_semantic(encoder):
    texts = ["red sports car", "a fast red automobile", "banana bread recipe"]
    first = encoder.encode(texts)
    assert first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    sims = first @ first.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    encoder.cache_dir = None  # recompute without the cache: same numbers
    np.testing.assert_allclose(encoder.encode(texts), first, atol=1e-5)


def test_batching_and_order_do_not_change_results(encoder):
    texts = ["one", "a much longer sentence about a cat on a mat", "two words"]
    together = encoder.encode(texts, batch_size=3)
    apart = np.vstack([encoder.encode([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(together, apart, atol=1e-5)


def test_cache_is_used_on_second_call(tmp_path):
    from components.text.encoder import TextEncoder

    enc = TextEncoder(device="cpu", cache_dir=tmp_path)
    first = enc.encode(["cached text"])
    assert len(list(tmp_path.glob("text-*.npy"))) == 1
    enc._encode_batch = lambda texts: (_ for _ in ()).throw(AssertionError("recomputed"))
    np.testing.assert_array_equal(enc.encode(["cached text"]), first)


def test_tokenize_and_content_words():
    assert tokenize("Red_Sports-car, 2 CARS!") == ["red", "sports-car", "cars"]
    assert content_words("The cat and the Clipart of a dog on it") == ["cat", "dog"]


def test_build_vocabulary_counts_documents_and_orders_deterministically():
    vocab = build_vocabulary(["red car", "red red bike", "blue car", "tree"], min_count=2)
    assert vocab.words == ("car", "red")
    assert vocab.counts == (2, 2)
    assert build_vocabulary(["a b c"], min_count=1).words == ()
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    assert build_vocabulary(["x1 cat dog", "cat dog", "cat"], min_count=1, max_words=1).words == ("cat",)
