"""itm_eval against a per-row brute-force ranking."""
import numpy as np
import pytest
import torch

from distill_utils import itm_eval


def brute_force(scores_i2t, scores_t2i, txt2img, img2txt):
    txt_ranks = []
    for i, row in enumerate(scores_i2t):
        order = list(np.argsort(row)[::-1])
        txt_ranks.append(min(order.index(t) for t in img2txt[i]))
    img_ranks = []
    for t, row in enumerate(scores_t2i):
        order = list(np.argsort(row)[::-1])
        img_ranks.append(order.index(txt2img[t]))
    out = {}
    for prefix, ranks in (("txt", np.array(txt_ranks)), ("img", np.array(img_ranks))):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


@pytest.mark.parametrize("as_tensor", [False, True])
def test_itm_eval_matches_brute_force(as_tensor):
    rng = np.random.default_rng(0)
    n_img = 30
    counts = rng.integers(1, 6, size=n_img)  # a varying number of captions per image
    img2txt, txt2img = [], []
    for i, c in enumerate(counts):
        img2txt.append(list(range(len(txt2img), len(txt2img) + c)))
        txt2img += [i] * c
    img = rng.normal(size=(n_img, 8))
    txt = img[txt2img] + rng.normal(scale=1.5, size=(len(txt2img), 8))  # correlated, so recall is not trivial
    i2t = img @ txt.T
    want = brute_force(i2t, i2t.T, txt2img, img2txt)
    got = itm_eval(torch.from_numpy(i2t) if as_tensor else i2t,
                   torch.from_numpy(i2t.T.copy()) if as_tensor else i2t.T, txt2img, img2txt)
    assert list(got) == ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                         "img_r_mean", "r_mean"]
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    assert 0 < got["r_mean"] < 100


def test_itm_eval_perfect_scores_give_full_recall():
    img2txt = [[0, 1], [2], [3, 4]]
    txt2img = [0, 0, 1, 2, 2]
    i2t = np.full((3, 5), -1.0)
    for i, caps in enumerate(img2txt):
        i2t[i, caps] = 1.0
    result = itm_eval(i2t, i2t.T, txt2img, img2txt)
    assert result["txt_r1"] == 100.0 and result["img_r1"] == 100.0 and result["r_mean"] == 100.0


def test_ties_count_against_the_ground_truth():
    """A collapsed model (every score equal) must not look perfect."""
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    flat = np.zeros((3, 6))
    result = itm_eval(flat, flat.T, txt2img, img2txt)
    assert result["txt_r1"] == 0.0 and result["img_r1"] == 0.0
    assert result["img_r5"] == 100.0  # rank 2 of 3 images (0-based) is inside the top 5


def test_the_authors_dicts_are_accepted_and_recalls_are_exact_counts():
    rng = np.random.default_rng(1)
    n_img, per = 37, 5  # 37 images: count/37*100 is not a float32-exact number
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(per)]
    img = rng.normal(size=(n_img, 8))
    i2t = img @ (img[txt2img] + rng.normal(scale=2.0, size=(n_img * per, 8))).T
    as_lists = itm_eval(i2t, i2t.T, txt2img, img2txt)
    as_dicts = itm_eval(i2t, i2t.T, {t: i for t, i in enumerate(txt2img)}, {i: c for i, c in enumerate(img2txt)})
    assert as_dicts == as_lists
    want = brute_force(i2t, i2t.T, txt2img, img2txt)
    for key in ("txt_r1", "txt_r5", "txt_r10"):
        count = round(want[key] * n_img / 100)
        assert as_lists[key] == count / n_img * 100  # exactly, not float32-rounded
    with pytest.raises(ValueError, match="keys 0..36"):
        itm_eval(i2t, i2t.T, txt2img, {i + 1: c for i, c in enumerate(img2txt)})


def test_nan_scores_are_misses_not_hits():
    """A diverged student (NaN embeddings) must score 0, not the 100 that NaN comparisons gave."""
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    diverged = np.full((3, 6), np.nan)
    result = itm_eval(diverged, diverged.T, txt2img, img2txt)
    assert all(result[key] == 0.0 for key in result), result
    partly = np.eye(3).repeat(2, axis=1)  # perfect scores, then one image and one caption go NaN
    partly[1, :] = np.nan
    result = itm_eval(partly, partly.T.copy(), txt2img, img2txt)
    assert result["txt_r1"] == pytest.approx(200 / 3)  # images 0 and 2 still find their captions
    assert result["img_r10"] == 0.0  # every caption's row holds image 1's NaN: undefined, a miss
