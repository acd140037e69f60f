"""Student-evaluation protocols (checked with an instrumented optimiser and scripted benchmarks),
mean ± std, the random baseline and eval.py's refusals."""
import numpy as np
import pytest
import torch

from distill_utils.runtime import checkpoint
from distill_utils.app import evaluate
from distill_utils.students.baselines import random_subsets
from distill_utils.students.evaluation import EvalSettings, StudentRun, measurement_epochs, summarise, train_student
from distill_utils.distillation.synthetic import FrozenSubset, SyntheticSet, make_similarity
from networks import DualEncoderConfig
from tests.helpers import shapes_args

CONFIG = DualEncoderConfig("convnet_tiny", text_dim=5, image_trainable=True)


class ScriptedBenchmark:
    """Returns r_mean values from a script, one per call, and records the calls."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0

    def evaluate(self, model):
        value = self.scores[self.calls]
        self.calls += 1
        return {"img_r1": value, "img_r5": value, "img_r10": value, "txt_r1": value, "txt_r5": value,
                "txt_r10": value, "r_mean": value}


def subset(n, lr_img, lr_txt, seed):
    g = torch.Generator().manual_seed(seed)
    return FrozenSubset(torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 5, generator=g), torch.eye(n), lr_img, lr_txt)


@pytest.fixture
def lr_log(monkeypatch):
    calls = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        calls.append((self.param_groups[0]["lr"], self.param_groups[1]["lr"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return calls


def test_paper_protocol_quirks(lr_log):
    """One schedule across phases (decay inside phase 0), current phase's step sizes everywhere,
    best point over every measurement of every phase, chosen on test."""
    subsets = [subset(4, 0.01, 0.02, 0), subset(4, 0.03, 0.05, 1)]
    settings = EvalSettings(epochs=4, batch_train=4, num_eval=1, loss_type="InfoNCE")
    scores = [1, 2, 9, 3, 4, 5, 6, 7, 8, 2]  # 5 measurements per phase (epochs < 10: every epoch)
    test = ScriptedBenchmark(scores)
    run = train_student(subsets, CONFIG, settings, test, None, 0, torch.device("cpu"))
    assert len(lr_log) == 10  # one batch per epoch, 5 epochs per phase
    expected = [(0.03, 0.05)] * 3 + [(0.003, 0.005)] * 7  # milestone 4 // 2 + 1 = 3, counted across phases
    assert np.allclose(lr_log, expected)
    assert test.calls == 10 and run.selected["r_mean"] == 9 and run.last["r_mean"] == 2


def test_own_phase_step_sizes(lr_log):
    subsets = [subset(4, 0.01, 0.02, 0), subset(4, 0.03, 0.05, 1)]
    settings = EvalSettings(epochs=4, batch_train=4, num_eval=1, loss_type="InfoNCE", phase_lr="own")
    train_student(subsets, CONFIG, settings, ScriptedBenchmark(range(10)), None, 0, torch.device("cpu"))
    assert np.allclose(lr_log, [(0.01, 0.02)] * 3 + [(0.001, 0.002)] * 2 + [(0.003, 0.005)] * 5)


def test_val_protocol_selects_on_val_and_reports_test():
    subsets = [subset(4, 0.01, 0.01, 0)]
    settings = EvalSettings(epochs=4, batch_train=4, num_eval=1, loss_type="InfoNCE", protocol="val")
    test = ScriptedBenchmark([10, 50, 20, 30, 40])
    val = ScriptedBenchmark([1, 2, 9, 3, 4])
    run = train_student(subsets, CONFIG, settings, test, val, 0, torch.device("cpu"))
    assert run.selected["r_mean"] == 20  # test at val's best point, not test's best (50)
    assert run.last["r_mean"] == 40


def test_eleven_measurements_and_few_epochs():
    assert measurement_epochs(100) == list(range(0, 101, 10))
    assert len(measurement_epochs(15)) == 11 and measurement_epochs(15)[-1] == 15
    assert measurement_epochs(3) == [0, 1, 2, 3]


def test_mean_and_std_over_runs():
    runs = [StudentRun(selected={"r_mean": v, "img_r1": 2 * v}, last={"r_mean": v, "img_r1": 0.0}) for v in (1.0, 2.0, 6.0)]
    summary = summarise(runs)
    assert summary["selected"]["mean"]["r_mean"] == pytest.approx(3.0)
    assert summary["selected"]["std"]["r_mean"] == pytest.approx(np.std([1.0, 2.0, 6.0]))
    assert summary["selected"]["mean"]["img_r1"] == pytest.approx(6.0)


def test_random_baseline_draws_distinct_pairs_of_the_right_sizes(shapes_root, tmp_path):
    args = evaluate.build_parser().parse_args(shapes_args(shapes_root, tmp_path, "--ckpt_path", "x.pt"))
    from distill_utils.app.context import load_data
    data = load_data(args, torch.device("cpu"), augment=False)
    reals = random_subsets(data, [7, 5], 0.1, 0.2, torch.Generator().manual_seed(0))
    assert [len(s) for s in reals] == [7, 5]
    keys = {tuple(t.tolist()) for s in reals for t in s.texts}
    assert len(keys) <= 12
    rows = [(s.images[i].sum().item(), s.texts[i].sum().item()) for s in reals for i in range(len(s))]
    assert len(set(rows)) == 12  # 12 distinct training pairs
    assert torch.equal(reals[0].similarity, torch.eye(7)) and reals[1].lr_txt == 0.2


def saved_checkpoint(path, n=4, size=16, text_dim=32, config=None):
    synthetic = SyntheticSet(torch.randn(n, 3, size, size), torch.randn(n, text_dim), make_similarity("full", n), 0.1, 0.1)
    checkpoint.save_distilled(path, synthetic, config or {}, 0, 0)
    return path


def test_wrong_checkpoints_fail_clearly(shapes_root, tmp_path):
    base = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1", "--epoch_eval_train", "1")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        evaluate.main(base + ["--ckpt_path", str(tmp_path / "missing.pt")])
    wrong_size = saved_checkpoint(tmp_path / "a.pt", size=32)
    with pytest.raises(checkpoint.CheckpointError, match="--image_size is 16"):
        evaluate.main(base + ["--ckpt_path", str(wrong_size)])
    wrong_text = saved_checkpoint(tmp_path / "b.pt", text_dim=384)
    with pytest.raises(checkpoint.CheckpointError, match="384-d text features"):
        evaluate.main(base + ["--ckpt_path", str(wrong_text)])
    other_model = saved_checkpoint(tmp_path / "c.pt", config={"image_encoder": "convnet"})
    with pytest.raises(checkpoint.CheckpointError, match="--image_encoder convnet"):
        evaluate.main(base + ["--ckpt_path", str(other_model)])
    (tmp_path / "d.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        evaluate.main(base + ["--ckpt_path", str(tmp_path / "d.pt")])


def test_eval_writes_the_table(shapes_root, tmp_path, capsys):
    good = saved_checkpoint(tmp_path / "good.pt", config={"image_encoder": "convnet_tiny"})
    rows = evaluate.main(shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "2",
                                     "--epoch_eval_train", "2", "--ckpt_path", str(good), "--baseline", "random", "full",
                                     "--full_epochs", "1", "--full_lr_scale", "1", "--full_batch", "16"))
    assert list(rows) == ["PTM-ST (4 pairs)", "random real subset (4 pairs)", "full training set (120 pairs)"]
    table = (tmp_path / "eval_results.md").read_text()
    assert "| Img R@1 | Img R@5 | Img R@10 | Txt R@1 | Txt R@5 | Txt R@10 | Mean |" in table and "±" in table
    assert "random real subset" in capsys.readouterr().out


def test_the_distilled_row_is_named_by_the_method_the_checkpoint_recorded(shapes_root, tmp_path):
    lors = saved_checkpoint(tmp_path / "lors.pt", config={"image_encoder": "convnet_tiny", "method": "lors"})
    rows = evaluate.main(shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1",
                                     "--epoch_eval_train", "1", "--ckpt_path", str(lors), "--baseline"))
    assert list(rows) == ["LoRS (4 pairs)"]


def test_a_students_result_does_not_depend_on_what_was_evaluated_before(shapes_root, tmp_path):
    """The first use of a benchmark reads its images through a DataLoader; that must not draw from the
    global generator (it shifted the dropout masks of the first student a process evaluated)."""
    args = evaluate.build_parser().parse_args(shapes_args(shapes_root, tmp_path, "--ckpt_path", "x.pt"))
    from distill_utils.app.context import load_data
    from distill_utils.students.retrieval import split_benchmarks
    data = load_data(args, torch.device("cpu"), augment=False, need_val=True)
    config = DualEncoderConfig("convnet_tiny", text_dim=data.text_dim, image_trainable=True)
    settings = EvalSettings(epochs=4, num_eval=1, protocol="val")
    subsets = [FrozenSubset(torch.stack([data.train[i][0] for i in range(6)]), data.train_text[:6].clone(),
                            torch.eye(6), 0.1, 0.1)]

    def history(test, val):
        return train_student(subsets, config, settings, test, val, 0, torch.device("cpu")).history
    fresh = history(*split_benchmarks(data, torch.device("cpu"), 4, 0))
    used = split_benchmarks(data, torch.device("cpu"), 4, 0)
    history(*used)
    assert history(*used) == fresh


class SnapshotBenchmark:
    """Records the student's parameters at every measurement (and scores nothing)."""

    def __init__(self):
        self.snapshots = []

    def evaluate(self, model):
        self.snapshots.append([p.detach().clone() for p in model.parameters()])
        return {k: 0.0 for k in ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")}


def hand_trained(subsets, schedule, epochs, batch, seed, phase_lr="current", momentum=0.9, weight_decay=5e-4):
    """The student schedules written out: SGD with momentum and weight decay by hand, the x0.1 decay
    by hand, the subsets (or their union) in the order the schedule says; the parameters after every epoch."""
    from distill_utils.students.evaluation import student_seed
    from distill_utils.distillation.losses import MultilabelContrastiveLoss
    from distill_utils.runtime.runlog import seeded
    seed = student_seed(seed, 0)
    if schedule == "union":
        n = sum(len(s) for s in subsets)
        similarity = torch.zeros(n, n)
        offset = 0
        for s in subsets:
            similarity[offset:offset + len(s), offset:offset + len(s)] = s.similarity
            offset += len(s)
        subsets = [FrozenSubset(torch.cat([s.images for s in subsets]), torch.cat([s.texts for s in subsets]),
                                similarity, subsets[-1].lr_img, subsets[-1].lr_txt)]
    with seeded(seed, torch.device("cpu")):
        model = CONFIG.build(seed=seed).train()
        image_ids = {id(p) for p in model.side_parameters("image")}
        params = model.side_parameters("image") + model.side_parameters("text")
        velocity = {id(p): None for p in params}
        criterion = MultilabelContrastiveLoss("InfoNCE")
        order = torch.Generator().manual_seed(seed)
        after, total_epochs = [], 0
        for k, s in enumerate(subsets):
            source = s if phase_lr == "own" else subsets[-1]
            for epoch in range(epochs + 1):
                decayed = (epoch if schedule == "restart" else total_epochs) > epochs // 2
                scale = 0.1 if decayed else 1.0
                for idx in torch.randperm(len(s), generator=order).split(batch):
                    loss = criterion(model(s.images[idx], s.texts[idx]), s.similarity[idx][:, idx])
                    grads = torch.autograd.grad(loss, params)
                    with torch.no_grad():
                        for p, g in zip(params, grads):
                            step = g + weight_decay * p
                            v = velocity[id(p)]
                            velocity[id(p)] = step.clone() if v is None else momentum * v + step
                            rate = (source.lr_img if id(p) in image_ids else source.lr_txt) * scale
                            p -= rate * velocity[id(p)]
                total_epochs += 1
                after.append([p.detach().clone() for p in model.parameters()])
    return after


@pytest.mark.parametrize("schedule, phase_lr", [("paper", "current"), ("paper", "own"), ("restart", "current"),
                                                ("restart", "own"), ("union", "current")])
def test_student_schedules_equal_a_hand_written_loop(schedule, phase_lr):
    """Every schedule trains exactly the parameters the written-out loop does, at every epoch; the
    schedules differ from one another (so the comparison could fail)."""
    g = torch.Generator().manual_seed(3)
    subsets = [subset(5, 0.02, 0.03, 0), subset(3, 0.05, 0.01, 1)]
    subsets[0].similarity[0, 1] = subsets[0].similarity[1, 0] = 0.5  # a learned-looking matrix
    subsets[1].similarity += 0.1 * torch.rand(3, 3, generator=g)
    settings = EvalSettings(epochs=4, batch_train=3, num_eval=1, loss_type="InfoNCE", phase_lr=phase_lr,
                            schedule=schedule)
    bench = SnapshotBenchmark()
    train_student(subsets, CONFIG, settings, bench, None, 0, torch.device("cpu"))
    expected = hand_trained(subsets, schedule, 4, 3, 0, phase_lr)
    assert len(bench.snapshots) == len(expected) == (5 if schedule == "union" else 10)
    for got, want in zip(bench.snapshots, expected):
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=2e-5)  # float32 sums in another order
    others = [hand_trained(subsets, other, 4, 3, 0, phase_lr)[-1] for other in ("paper", "restart", "union")
              if other != schedule and not (other == "union" and phase_lr == "own")]
    for other in others:
        assert max((a - b).abs().max().item() for a, b in zip(bench.snapshots[-1], other)) > 1e-2


def test_union_with_own_step_sizes_is_refused(shapes_root, tmp_path):
    with pytest.raises(Exception, match="drop --phase_lr own"):
        EvalSettings(schedule="union", phase_lr="own")
    args = shapes_args(shapes_root, tmp_path, "--ckpt_path", "x.pt", "--student_schedule", "union", "--phase_lr", "own")
    with pytest.raises(SystemExit):
        evaluate.parse_args(args)


def test_union_similarity_is_block_diagonal():
    from distill_utils.students.evaluation import union_of
    a, b = subset(2, 0.1, 0.2, 0), subset(3, 0.3, 0.4, 1)
    a.similarity[0, 1] = 0.7
    joined = union_of([a, b])
    assert joined.similarity.shape == (5, 5) and joined.similarity[0, 1] == 0.7
    assert joined.similarity[:2, 2:].abs().sum() == 0 and joined.similarity[2:, :2].abs().sum() == 0
    assert torch.equal(joined.images[2:], b.images) and (joined.lr_img, joined.lr_txt) == (0.3, 0.4)


def test_other_schedules_write_their_own_result_files():
    from argparse import Namespace
    assert evaluate.results_stem(Namespace(student_image_encoder=None, student_schedule="paper")) == "eval_results"
    assert evaluate.results_stem(Namespace(student_image_encoder=None, student_schedule="union")) == \
        "eval_results_schedule_union"
    assert evaluate.results_stem(Namespace(student_image_encoder="convnet", student_schedule="restart")) == \
        "eval_results_student_convnet_schedule_restart"
