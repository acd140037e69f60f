"""The comparisons as the methods' authors run them: PTM-ST's published structure, disjoint phase
initialisation, the split-random reference row and the full-data row trained to a recipe chosen on val."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill_utils.students import baselines, full_data
from networks import DualEncoderConfig
from distill_utils.app import ablation, distill, evaluate
from distill_utils.app.context import load_data, model_config
from distill_utils.students.retrieval import split_benchmarks
from distill_utils.pipeline import sweep
from distill_utils.distillation import phases

from .helpers import shapes_args, workdir


@pytest.mark.parametrize("budget, sizes", [(20, [20]), (100, [100]), (101, [50, 51]), (200, [100, 100]),
                                           (499, [249, 250]), (500, [200, 300]), (1000, [400, 600])])
def test_published_sizes_follow_the_authors_recipes(budget, sizes):
    assert sweep.published_sizes(budget) == sizes and sum(sizes) == budget


def plan_of(**changes) -> ablation.Plan:
    return replace(ablation.REAL_PRESETS["default"], **changes)


def test_each_phase_runs_as_many_iterations_as_a_one_phase_method():
    plan = plan_of()
    one = sum(plan.quickstart.iterations)
    assert sweep.phase_iterations(plan, "lors", 200) == [one]
    assert sweep.phase_iterations(plan, "ptmst", 200) == [one, one]
    assert sweep.phase_iterations(plan, "ptmst", 50) == [one]  # one phase at 100 pairs or fewer
    split = plan_of(ptmst_iterations="split")
    assert sum(sweep.phase_iterations(split, "ptmst", 200)) == one
    even = plan_of(ptmst_layout="even", ptmst_iterations="split")
    assert sweep.phase_sizes(even, "ptmst", 50) == [25, 25]
    assert sweep.phase_iterations(even, "ptmst", 50) == list(even.quickstart.iterations)


def test_the_one_phase_layout_is_the_first_phase_alone_at_every_budget(tmp_path):
    one = plan_of(ptmst_layout="one")
    total = sum(one.quickstart.iterations)
    assert sweep.phase_sizes(one, "ptmst", 500) == [500]
    assert sweep.phase_iterations(one, "ptmst", 500) == [total]
    flags = flags_of(one, "ptmst", 500, tmp_path)
    assert [Path(p).name for p in flags.buffer_path] == ["convexified_0_6"] and flags.ema_decay[-1] == 0.99
    # at 100 pairs or fewer it is exactly the published run (the same flags: one folder for both rows)
    assert sweep.distill_flags(one, workdir(tmp_path), "ptmst", 100, 0, {"shortcuts": ["a", "b"]}, tmp_path, "x") == \
        sweep.distill_flags(plan_of(), workdir(tmp_path), "ptmst", 100, 0, {"shortcuts": ["a", "b"]}, tmp_path, "x")


def test_iterations_and_the_dataset_reach_the_plan_of_real_images():
    plan = ablation.parse_args(["--dataset", "openclipart", "--iterations", "300"]).plan
    assert plan.quickstart.dataset == "openclipart" and plan.quickstart.expert_batch == 256
    assert sum(plan.quickstart.iterations) == 300 and sweep.phase_iterations(plan, "ptmst", 200) == [300, 300]
    assert ablation.parse_args(["--dataset", "stamps"]).plan.quickstart == ablation.STAMPS
    with pytest.raises(SystemExit):
        ablation.parse_args(["--iterations", "1"])


def flags_of(plan: ablation.Plan, method: str, budget: int, tmp_path: Path) -> argparse.Namespace:
    folders = {"normal": tmp_path / "normal", "frozen": tmp_path / "frozen",
               "shortcuts": [tmp_path / "convexified_0_6", tmp_path / "convexified_0_8"]}
    flags = sweep.distill_flags(plan, workdir(tmp_path), method, budget, 0, folders, tmp_path / "runs", "x")
    parser = argparse.ArgumentParser()
    for name in ("--buffer_path", "--min_start_epoch", "--max_start_epoch", "--num_queries", "--Iteration"):
        parser.add_argument(name, nargs="+")
    parser.add_argument("--ema_decay", type=float, action="append")
    return parser.parse_known_args(flags)[0]


def test_ptmst_phases_match_their_own_endpoints_from_the_authors_start_ranges(tmp_path):
    two = flags_of(plan_of(), "ptmst", 200, tmp_path)
    assert [Path(p).name for p in two.buffer_path] == ["convexified_0_6", "convexified_0_8"]
    assert (two.min_start_epoch, two.max_start_epoch, two.num_queries) == (["0", "1"], ["2", "3"], ["100", "100"])
    assert two.ema_decay[-1] == 0.99  # the last --ema_decay is the one argparse keeps
    one = flags_of(plan_of(), "ptmst", 100, tmp_path)
    assert [Path(p).name for p in one.buffer_path] == ["convexified_0_6"] and one.num_queries == ["100"]
    shared = flags_of(plan_of(ptmst_endpoints="shared"), "ptmst", 200, tmp_path)
    assert [Path(p).name for p in shared.buffer_path] == ["convexified_0_6"] * 2
    lors = flags_of(plan_of(), "lors", 200, tmp_path)
    assert lors.ema_decay[-1] == 0.0 and lors.num_queries == ["200"]


def test_the_ablation_flags_reach_the_plan_and_bad_ones_are_refused(capsys):
    args = ablation.parse_args(["--ptmst_layout", "even", "--ptmst_endpoints", "shared", "--ptmst_iterations",
                                "split", "--ptmst_ema", "0.9"])
    plan = args.plan
    assert (plan.ptmst_layout, plan.ptmst_endpoints, plan.ptmst_iterations, plan.ptmst_ema) == \
        ("even", "shared", "split", 0.9)
    assert ablation.parse_args([]).plan.ptmst_layout == "published"
    with pytest.raises(SystemExit):
        ablation.parse_args(["--ptmst_ema", "1.0"])
    assert "--ptmst_ema 1.0" in capsys.readouterr().err
    # one phase up to 100 pairs: a budget of 1 is fine for the published layout, not for two even phases
    assert ablation.parse_args(["--budgets", "1"]).plan.budgets == (1,)
    with pytest.raises(SystemExit):
        ablation.parse_args(["--budgets", "1", "--ptmst_layout", "even"])


def phase_args(seed: int, sizes, phase_init: str) -> argparse.Namespace:
    return argparse.Namespace(seed=seed, num_queries=list(sizes), phase_init=phase_init, pair_init="random")


def picks_of(args: argparse.Namespace, available: int):
    data = SimpleNamespace(train=range(available))
    picks = []
    for k, size in enumerate(args.num_queries):
        spec = SimpleNamespace(index=k, num_queries=size)
        generator = torch.Generator().manual_seed(args.seed * 1000 + k)
        picks.append(phases.initial_pairs(spec, args, data, generator, None).tolist())
    return picks


def brute_force_disjoint(seed: int, sizes, available: int):
    taken, picks = [], []
    for k, size in enumerate(sizes):
        order = torch.randperm(available, generator=torch.Generator().manual_seed(seed * 1000 + k)).tolist()
        free = [i for i in order if i not in taken][:size]
        picks.append(free)
        taken += free
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_disjoint_phases_never_share_a_starting_pair(seed):
    sizes, available = (15, 12, 9), 40
    disjoint = picks_of(phase_args(seed, sizes, "disjoint"), available)
    assert disjoint == brute_force_disjoint(seed, sizes, available)
    flat = [i for p in disjoint for i in p]
    assert len(flat) == len(set(flat)) == sum(sizes)
    independent = picks_of(phase_args(seed, sizes, "independent"), available)
    assert disjoint[0] == independent[0]
    if len({i for p in independent for i in p}) == sum(sizes):  # no overlap: the very same draws
        assert disjoint == independent


def test_disjoint_draws_match_independent_ones_when_nothing_overlaps():
    # 10,000 pairs: two phases of 5 hardly ever collide, so the draws are the independent ones
    assert picks_of(phase_args(7, (5, 5), "disjoint"), 10_000) == picks_of(phase_args(7, (5, 5), "independent"), 10_000)


def test_disjoint_phases_reuse_pairs_only_when_the_data_runs_out():
    picks = picks_of(phase_args(0, (8, 6), "disjoint"), 10)
    assert len(set(picks[1])) == 6 and set(picks[0]) | set(picks[1]) == set(range(10))


def fake_data(n: int = 30, dim: int = 4):
    images = torch.randn(n, 3, 2, 2)
    return SimpleNamespace(train=[(images[i], i) for i in range(n)], train_text=torch.randn(n, dim))


def test_split_random_row_holds_the_random_rows_pairs_cut_into_the_phases():
    data = fake_data()
    whole = baselines.baseline_subsets("random", data, [7, 5], 0.1, 0.2, 3, None)
    split = baselines.baseline_subsets("random_split", data, [7, 5], 0.1, 0.2, 3, None)
    assert [len(s.texts) for s in whole] == [12] and [len(s.texts) for s in split] == [7, 5]
    assert torch.equal(whole[0].texts, torch.cat([s.texts for s in split]))
    assert torch.equal(split[1].similarity, torch.eye(5)) and split[1].lr_txt == 0.2
    assert baselines.baseline_label("random_split", [7, 5]) == "random real subset, split 7 + 5"


def test_the_random_row_of_a_set_larger_than_the_data_draws_each_phase_and_trains_them_at_once():
    data = fake_data(n=10)
    (whole,) = baselines.baseline_subsets("random", data, [7, 6], 0.1, 0.1, 0, None)
    split = baselines.baseline_subsets("random_split", data, [7, 6], 0.1, 0.1, 0, None)
    assert torch.equal(whole.texts, torch.cat([s.texts for s in split])) and torch.equal(whole.similarity, torch.eye(13))


def test_ablation_split_row_uses_ptmst_sizes():
    data = fake_data()
    model = argparse.Namespace(lr_teacher_img=0.1, lr_teacher_txt=0.1)
    split = sweep.reference_subsets(sweep.RANDOM_SPLIT, data, [6, 4], 0, None, model)
    whole = sweep.reference_subsets("random", data, [6, 4], 0, None, model)
    assert [len(s.texts) for s in split] == [6, 4] and [len(s.texts) for s in whole] == [10]
    assert torch.equal(whole[0].images, torch.cat([s.images for s in split]))


def test_reference_rows_are_kept_by_fingerprint_and_trained_again_when_it_changes(tmp_path, monkeypatch, caplog):
    experts = tmp_path / "experts"
    experts.mkdir()
    (experts / "img_replay_buffer_0.pt").write_bytes(b"one expert")
    trained = []

    def train(job):
        trained.append(job.row)
        return {(job.row, 4, 0): {"val": {"r_mean": 0.1 + 0.2}}}, {job.row: 1.0 / 3}
    monkeypatch.setattr(sweep.ReferenceRow, "train", train)
    model = argparse.Namespace(dataset="shapes", lr_img=0.1)

    def job(row="random", plan=sweep.Plan(budgets=(4,), seeds=(0,))):
        return sweep.ReferenceRow(tmp_path, plan, model, experts, row)
    assert not job().done()
    first = job()()
    assert trained == ["random"] and job().done()
    assert job()() == first == ({("random", 4, 0): {"val": {"r_mean": 0.1 + 0.2}}}, {"random": 1.0 / 3})
    assert trained == ["random"]  # read back exactly, not trained again
    assert not job(sweep.FULL_DATA).done() and not job(plan=sweep.Plan(budgets=(4,), seeds=(1,))).done()
    (experts / "img_replay_buffer_1.pt").write_bytes(b"a second expert")  # the experts were topped up
    assert not job().done()
    job()()
    (experts / "img_replay_buffer_0.pt").write_bytes(b"one EXPERT")  # retrained: same name, same size
    assert not job().done()
    job()()
    job().cache().write_text("{cut")
    assert job()() == first and "cannot be read" in caplog.text and len(trained) == 4


def test_a_sets_students_are_trained_again_when_its_set_is_rewritten(tmp_path):
    run = tmp_path / "mttvl_b4_s0_abc"
    run.mkdir()
    flags = {"Iteration": [3], "epoch_eval_train": 2, "batch_train": 8, "loss_type": "InfoNCE", "phase_lr": None,
             "lr_img": 0.1}
    (run / "args.json").write_text(json.dumps(flags))
    (run / "distilled_0_3.pt").write_bytes(b"a distilled set")
    job = sweep.SetStudents(tmp_path, sweep.Plan(budgets=(4,), seeds=(0,)), argparse.Namespace(),
                            sweep.RunRecord("mttvl", 4, 0, str(run), 1.0))
    kept = job.cache()
    assert job.cache() == kept  # the same set: its students are found again
    (run / "distilled_0_3.pt").write_bytes(b"A distilled set")  # distilled again: same name, same size
    assert job.cache() != kept
    (run / "distilled_0_3.pt").write_bytes(b"a distilled set")
    assert job.cache() == kept


def history(values):
    return full_data.StudentRun(selected={"r_mean": max(values)}, last={"r_mean": values[-1]},
                                history=[{"epoch": k, "val": {"r_mean": v}, "test": {"r_mean": v}}
                                         for k, v in enumerate(values)])


def test_the_full_data_recipe_is_the_one_best_on_val(monkeypatch):
    settings = full_data.FullDataSettings(epochs=(2, 4), lr_scales=(1.0, 2.0), batches=(8,))
    val_scores = {(2, 0.1, 8): [1, 3], (2, 0.2, 8): [float("nan")], (4, 0.1, 8): [2, 9, 5], (4, 0.2, 8): [4, 4]}
    seeds = []

    def fake(source, config, recipe, settings, test, val, seed, device):
        seeds.append(seed)
        return history(val_scores[(recipe.epochs, round(recipe.lr_img, 6), recipe.batch)])
    monkeypatch.setattr(full_data, "train_on_all", fake)
    chosen, scores = full_data.choose_recipe(None, None, settings, None, None, "cpu")
    assert settings.grid()[chosen] == (4, 1.0, 8) and scores[chosen]["val_r_mean"] == 9
    assert math.isnan(scores[1]["val_r_mean"]) and len(set(seeds)) == 1  # one search seed for every configuration
    assert seeds[0] not in {full_data.student_seed(0, k) for k in range(5)}
    val_scores.update({key: [float("nan")] for key in val_scores})
    with pytest.raises(FloatingPointError, match="--full_lr_scale"):
        full_data.choose_recipe(None, None, settings, None, None, "cpu")


@pytest.fixture()
def shapes_problem(shapes_root, tmp_path):
    args = evaluate.parse_args(shapes_args(shapes_root, tmp_path, "--image_trainable", "false", "--out_embedding", "16",
                                           "--ckpt_path", str(tmp_path / "unused.pt")))
    device = torch.device("cpu")
    data = load_data(args, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, 64, 0)
    return data, model_config(args, data.text_dim), test, val


def test_streamed_and_in_memory_full_data_students_agree(shapes_problem):
    data, config, test, val = shapes_problem
    recipe = full_data.Recipe(epochs=3, lr_img=0.1, lr_txt=0.1, batch=16)
    results = []
    for limit in (1 << 30, 0):
        settings = full_data.FullDataSettings(memory_limit_bytes=limit)
        source = full_data.pair_source(data, settings, torch.device("cpu"))
        assert source.in_memory == (limit > 0)
        results.append(full_data.train_on_all(source, config, recipe, settings, test, val, 5, torch.device("cpu")))
    for a, b in zip(results[0].history, results[1].history):
        assert a["epoch"] == b["epoch"]
        for split in ("test", "val"):
            assert a[split]["r_mean"] == pytest.approx(b[split]["r_mean"], abs=1e-6)
    assert [h["epoch"] for h in results[0].history] == [0, 1, 2, 3]


def identity_loss(model, images, texts) -> float:
    """Cross-entropy of each image against its own caption among all, computed outside the training loop."""
    model.eval()
    with torch.no_grad():
        logits = model(images, texts)
        return 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(len(images)))
                      + torch.nn.functional.cross_entropy(logits.T, torch.arange(len(images)))).item()


def test_a_full_data_student_learns_the_identity_pairing():
    """64 random images, each with its own random text feature: the pairing is learnable, so a student of the
    full-data recipe must lower the pairing's cross-entropy well below a fresh model's."""
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(64, 3, 16, 16, generator=generator), torch.randn(64, 32, generator=generator)
    data = SimpleNamespace(train=[(images[i], i) for i in range(64)], train_text=texts)
    config = DualEncoderConfig(image_encoder="convnet_tiny", text_dim=32, image_trainable=True)
    settings = full_data.FullDataSettings()
    source = full_data.pair_source(data, settings, torch.device("cpu"))
    before = identity_loss(config.build(seed=9), images, texts)
    model, history = full_data.fit_student(source, config, full_data.Recipe(20, 0.1, 0.1, 16), settings, 9,
                                           torch.device("cpu"), lambda m: {})
    assert identity_loss(model, images, texts) < 0.7 * before
    assert [h["epoch"] for h in history] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
