"""The text-embedding cache: built once, reused, rebuilt when stale, written atomically."""
import numpy as np
import pytest
import torch

from distill_utils.data import text_cache


class CountingEncoder(torch.nn.Module):
    calls = 0

    def encode(self, captions, batch_size=256, progress=""):
        CountingEncoder.calls += 1
        return torch.tensor([[float(len(c)), float(i)] for i, c in enumerate(captions)])


@pytest.fixture(autouse=True)
def _reset():
    CountingEncoder.calls = 0


def test_cache_names_follow_the_reference():
    assert text_cache.cache_path("npz", "flickr", "bert", "test").as_posix() == "npz/flickr_bert_text_embed.npz"
    assert text_cache.cache_path("npz", "flickr", "bert", "train").as_posix() == "npz/flickr_bert_train_text_embed.npz"


def test_built_once_then_reused(tmp_path):
    path = tmp_path / "new_folder" / "x_text_embed.npz"
    captions = ["a", "bb", "ccc"]
    first = text_cache.load_or_build(path, captions, CountingEncoder)
    second = text_cache.load_or_build(path, captions, CountingEncoder)
    assert CountingEncoder.calls == 1 and torch.equal(first, second) and first.shape == (3, 2)
    with np.load(path) as archive:
        assert archive["bert_test_embed"].shape == (3, 2)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_stale_row_count_rebuilds(tmp_path):
    path = tmp_path / "x.npz"
    text_cache.load_or_build(path, ["a", "bb"], CountingEncoder)
    rebuilt = text_cache.load_or_build(path, ["a", "bb", "ccc"], CountingEncoder)
    assert CountingEncoder.calls == 2 and rebuilt.shape[0] == 3


def test_other_captions_same_count_rebuilds(tmp_path):
    path = tmp_path / "x.npz"
    text_cache.load_or_build(path, ["a", "bb"], CountingEncoder)
    rebuilt = text_cache.load_or_build(path, ["ccc", "dddd"], CountingEncoder)
    assert CountingEncoder.calls == 2 and rebuilt[0, 0] == 3.0


def test_reference_cache_without_digest_is_read(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, bert_test_embed=np.ones((2, 4), dtype=np.float32))
    loaded = text_cache.load_or_build(path, ["a", "b"], CountingEncoder)
    assert CountingEncoder.calls == 0 and loaded.shape == (2, 4)


def test_corrupt_cache_rebuilds(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"garbage")
    text_cache.load_or_build(path, ["a"], CountingEncoder)
    assert CountingEncoder.calls == 1
