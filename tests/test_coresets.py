"""Coreset selections against brute-force versions, the forgetting sidecar buffer.py writes, and the
eval.py rows (coresets and cross-architecture students) on tiny data."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from distill_utils.students import baselines, coresets
from distill_utils.experts import trajectories
from distill_utils.app import buffer, evaluate
from distill_utils.runtime.errors import UsageError

from .helpers import shapes_args
from .test_evaluation import saved_checkpoint


def brute_force_herding(points, count):
    """Exhaustive greedy in plain Python floats: at each step try every unchosen point."""
    dims = len(points[0])
    mean = [sum(p[d] for p in points) / len(points) for d in range(dims)]
    chosen, total = [], [0.0] * dims
    for step in range(1, count + 1):
        best, best_distance = None, math.inf
        for i, p in enumerate(points):
            if i in chosen:
                continue
            distance = math.sqrt(sum(((total[d] + p[d]) / step - mean[d]) ** 2 for d in range(dims)))
            if distance < best_distance:
                best, best_distance = i, distance
        chosen.append(best)
        total = [total[d] + points[best][d] for d in range(dims)]
    return chosen


def brute_force_k_center(points, count):
    def dist(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    dims = len(points[0])
    mean = [sum(p[d] for p in points) / len(points) for d in range(dims)]
    chosen = [min(range(len(points)), key=lambda i: (dist(points[i], mean), i))]
    while len(chosen) < count:
        gaps = {i: min(dist(points[i], points[c]) for c in chosen) for i in range(len(points)) if i not in chosen}
        chosen.append(max(gaps, key=lambda i: (gaps[i], -i)))
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_herding_and_k_center_equal_their_brute_force_greedy(seed):
    features = torch.randn(30, 5, generator=torch.Generator().manual_seed(seed))
    points = features.double().tolist()
    assert coresets.herding(features, 12) == brute_force_herding(points, 12)
    assert coresets.k_center(features, 12) == brute_force_k_center(points, 12)


def test_k_center_is_a_2_approximation_of_the_optimal_cover():
    features = torch.randn(12, 2, generator=torch.Generator().manual_seed(5)).double()
    distances = torch.cdist(features, features)

    def radius(centers):
        return distances[:, list(centers)].min(dim=1).values.max().item()
    optimum = min(radius(c) for c in itertools.combinations(range(12), 3))
    assert radius(coresets.k_center(features, 3)) <= 2 * optimum + 1e-12


def test_herding_mean_approaches_the_data_mean_faster_than_random():
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).double()
    chosen = coresets.herding(features, 20)
    gap = (features[chosen].mean(0) - features.mean(0)).norm()
    random_gaps = [(features[torch.randperm(200, generator=torch.Generator().manual_seed(s))[:20]].mean(0)
                    - features.mean(0)).norm() for s in range(20)]
    assert gap < min(random_gaps)


def test_forgetting_events_counted_from_a_hand_made_history():
    tracker = coresets.ForgettingTracker(4)
    history = [  # (pairs presented, retrieved?) per batch
        ([0, 1, 2], [True, False, True]),
        ([0, 1, 3], [False, True, True]),   # pair 0 forgotten
        ([2, 0], [False, True]),            # pair 2 forgotten
        ([0, 1, 2, 3], [False, False, True, True]),  # pairs 0 and 1 forgotten
    ]
    for pairs, retrieved in history:
        tracker.record(np.array(pairs), np.array(retrieved))
    assert tracker.events.tolist() == [2, 1, 1, 0]
    assert tracker.learned.tolist() == [True, True, True, True]
    assert tracker.presentations.tolist() == [4, 3, 3, 2]


def test_in_batch_retrieval_needs_both_directions_and_counts_ties_as_retrieved():
    logits = torch.tensor([[5.0, 1.0, 0.0],
                           [6.0, 2.0, 0.0],    # image 1 prefers caption 0
                           [0.0, 0.0, 3.0]])
    # pair 0: image 0 -> caption 0 yes, but caption 0 -> image 1 (6 > 5): not retrieved
    assert coresets.ForgettingTracker.retrieved_in_batch(logits).tolist() == [False, False, True]
    tied = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # two captions of one image
    assert coresets.ForgettingTracker.retrieved_in_batch(tied).tolist() == [True, True]


def test_forgetting_ranking_puts_never_learned_first_then_most_forgotten():
    events = [0, 3, 1, 3, 0, 2]
    learned = [True, True, True, True, False, True]
    ranking = coresets.forgetting_ranking(events, learned, 6, seed=0)
    assert ranking[0] == 4 and set(ranking[1:3]) == {1, 3} and ranking[3:] == [5, 2, 0]
    assert coresets.forgetting_ranking(events, learned, 6, seed=0) == ranking  # reruns select the same
    orders = {tuple(coresets.forgetting_ranking(events, learned, 3, seed=s)[1:3]) for s in range(20)}
    assert orders == {(1, 3), (3, 1)}  # ties are broken by the seed, not by index


def test_split_ranking_takes_consecutive_chunks():
    assert coresets.split_ranking([5, 4, 3, 2, 1], [2, 3]) == [[5, 4], [3, 2, 1]]
    with pytest.raises(ValueError):
        coresets.split_ranking([1, 2], [2, 1])


def test_buffer_writes_each_experts_forgetting_record_beside_its_twins(expert_dirs, shapes_root, tmp_path):
    _, normal, shortcut, _ = expert_dirs
    from distill_utils.app.context import load_data
    args = evaluate.build_parser().parse_args(shapes_args(shapes_root, tmp_path, "--ckpt_path", "x.pt"))
    data = load_data(args, torch.device("cpu"), augment=False)
    digest = coresets.pairs_digest(data.train.image_paths(), data.train.captions)
    for index in trajectories.twin_indices(normal):
        record = trajectories.read_forgetting(normal, index, digest)
        assert record["pairs"] == len(data.train) == 120
        # 3 epochs: every pair presented once per epoch, and no more events than presentations allow
        assert record["presentations"] == [3] * 120
        assert all(0 <= e <= 1 for e in record["events"])
    assert trajectories.experts_source(shortcut) == normal.resolve()
    with pytest.raises(trajectories.TrajectoryError, match="another training set"):
        trajectories.read_forgetting(normal, 0, "0" * 40)
    # buffer.py's folder holds the experts, their records and meta.json only (the shared fixture stays clean)
    assert all(p.is_file() for p in normal.iterdir())


def test_a_folder_without_forgetting_records_gets_a_clear_message(tmp_path):
    with pytest.raises(trajectories.TrajectoryError, match="--expert_dir"):
        trajectories.read_forgetting(tmp_path, 0, "x")
    trajectories.forgetting_path(tmp_path, 1).write_text("{not json")
    with pytest.raises(trajectories.TrajectoryError, match="damaged"):
        trajectories.read_forgetting(tmp_path, 1, "x")


def test_a_lone_forgetting_record_is_a_leftover_of_a_killed_writer(tmp_path):
    trajectories.forgetting_path(tmp_path, 0).write_text("{}")
    assert trajectories._leftovers(tmp_path, 0) == [trajectories.forgetting_path(tmp_path, 0)]


def eval_base(shapes_root, tmp_path, normal):
    good = saved_checkpoint(tmp_path / "good.pt", config={"image_encoder": "convnet_tiny"})
    return shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1", "--epoch_eval_train", "1",
                       "--ckpt_path", str(good), "--expert_dir", str(normal))


def test_eval_coreset_rows_select_the_pairs_their_ranking_names(expert_dirs, shapes_root, tmp_path, monkeypatch):
    _, normal, _, _ = expert_dirs
    picked = {}
    original = baselines.real_subsets

    def spy(data, chunks, lr_img, lr_txt):
        picked.setdefault(len(picked), [list(c) for c in chunks])
        return original(data, chunks, lr_img, lr_txt)
    monkeypatch.setattr(baselines, "real_subsets", spy)
    rows = evaluate.main(eval_base(shapes_root, tmp_path, normal) + [
        "--baseline", "forgetting", "kcenter", "random", "herding"])
    assert list(rows) == ["PTM-ST (4 pairs)", "random real subset (4 pairs)", "herding coreset (4 pairs)",
                          "k-center coreset (4 pairs)", "forgetting coreset (4 pairs)"]
    # herding's pairs are the brute-force herding of the first expert's final joint embeddings
    from distill_utils.app.context import load_data, model_config
    args = evaluate.parse_args(eval_base(shapes_root, tmp_path, normal))
    data = load_data(args, torch.device("cpu"), augment=False)
    model, index = coresets.expert_at_end(model_config(args, data.text_dim), normal, torch.device("cpu"))
    assert index == 0
    train = data.train
    joint = coresets.pair_embeddings(model, lambda p: train.transform(train.folder(p)), train.image_paths(),
                                     data.train_text, torch.device("cpu"), batch_size=7).joint()
    # independent embedding: the model's own encode_image / encode_text on every pair
    with torch.no_grad():
        model.eval()
        images = torch.stack([train[i][0] for i in range(len(train))])
        direct = torch.cat([model.encode_image(images), model.encode_text(data.train_text)], dim=1).double()
    assert torch.allclose(joint, direct, atol=1e-5)
    assert picked[1] == [brute_force_herding(direct.tolist(), 4)]
    assert picked[2] == [brute_force_k_center(direct.tolist(), 4)]
    record = json.loads(trajectories.forgetting_path(normal, 0).read_text())
    assert picked[3] == [coresets.forgetting_ranking(record["events"], record["learned"], 4, seed=0)]


def test_cross_architecture_students_and_the_text_encoder_refusal(expert_dirs, shapes_root, tmp_path):
    _, normal, _, _ = expert_dirs
    base = eval_base(shapes_root, tmp_path, normal)
    rows = evaluate.main(base + ["--baseline", "random", "--student_image_encoder", "convnet",
                                 "--student_image_size", "24"])
    assert list(rows) == ["PTM-ST (4 pairs), student convnet, 24 px",
                          "random real subset (4 pairs), student convnet, 24 px"]
    assert "students: convnet, 24 px" in (tmp_path / "eval_results_student_convnet.md").read_text()
    assert not (tmp_path / "eval_results.md").exists()  # the distiller's own table is never replaced
    with pytest.raises(UsageError, match="text encoder"):
        evaluate.main(base + ["--student_image_encoder", "convnet", "--student_text_encoder", "bert"])
    with pytest.raises(UsageError, match="--student_image_encoder"):
        evaluate.main(base + ["--student_image_size", "24"])


def test_resized_students_see_images_at_their_own_size():
    from networks import DualEncoderConfig
    seen = []
    model = DualEncoderConfig("convnet_tiny", text_dim=8, image_trainable=True, input_size=24).build(seed=0)
    model.image_encoder.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape))
    model(torch.randn(2, 3, 16, 16), torch.randn(2, 8))
    assert seen == [torch.Size([2, 3, 24, 24])]


def test_coresets_without_experts_are_refused(shapes_root, tmp_path):
    good = saved_checkpoint(tmp_path / "good.pt", config={"image_encoder": "convnet_tiny"})
    with pytest.raises(UsageError, match="--expert_dir"):
        evaluate.main(shapes_args(shapes_root, tmp_path, "--image_trainable", "--ckpt_path", str(good),
                                  "--baseline", "herding"))
