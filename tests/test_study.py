"""sh/study.sh: the matching gradient the gradients study records (checked by hand-written autograd),
its cosine matrices, and every study end to end at smoke size."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from distill_utils import MultilabelContrastiveLoss
from distill_utils.app import study
from distill_utils.runtime.runs import RunFolder
from distill_utils.distillation.matching import TrajectoryMatcher
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
from networks import SIDES, DualEncoderConfig

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


class MemoryExpert:
    """Snapshots held in memory, float64 (``flat`` as the trajectory readers give it)."""

    def __init__(self, snapshots):
        self.snapshots = snapshots

    def flat(self, side, t):
        return self.snapshots[t][side]


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = DualEncoderConfig("convnet_tiny", text_dim=7, image_trainable=True, out_embedding=6).build(seed=seed)
    model = model.double().train()
    g = torch.Generator().manual_seed(seed)
    n = 6
    similarity = make_similarity("full", n, rank=2, alpha=1.0, generator=g).double()
    synthetic = SyntheticSet(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
                             torch.randn(n, 7, generator=g, dtype=torch.float64), similarity, 0.05, 0.07).double()
    base = {side: torch.cat([p.detach().flatten() for p in model.side_parameters(side)]) for side in SIDES}
    snapshots = [{side: base[side] + 0.05 * t * torch.randn(base[side].shape, generator=g, dtype=torch.float64)
                  for side in SIDES} for t in range(4)]
    return model, synthetic, MemoryExpert(snapshots)


def by_hand_gradient(model, synthetic, start, target, batches, seed):
    """The matching objective written out: each student step's gradient at the (detached) current
    parameters, the end point start - eta * sum of them, the squared distance to the target over the
    start's, summed over the sides; its gradient by autograd."""
    names = {side: [n for n, p in model.named_parameters() if any(p is q for q in model.side_parameters(side))]
             for side in SIDES}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    criterion = MultilabelContrastiveLoss("InfoNCE")
    torch.manual_seed(seed)
    theta = {side: start[side].clone() for side in SIDES}
    total = {side: 0.0 for side in SIDES}
    for idx in batches:
        leaves = {side: theta[side].detach().requires_grad_(True) for side in SIDES}
        params = {}
        for side in SIDES:
            offset = 0
            for name in names[side]:
                size = shapes[name].numel()
                params[name] = leaves[side][offset:offset + size].view(shapes[name])
                offset += size
        logits = functional_call(model, params, (synthetic.images[idx], synthetic.texts[idx]))
        loss = criterion(logits, synthetic.similarity.matrix_full()[idx][:, idx])
        grads = torch.autograd.grad(loss, [leaves[s] for s in SIDES], create_graph=True)
        for side, grad in zip(SIDES, grads):
            total[side] = total[side] + grad
            theta[side] = leaves[side].detach() - synthetic.step_size(side).detach() * grad.detach()
    objective = sum(((start[s] - synthetic.step_size(s) * total[s] - target[s]).square().sum()
                     / (start[s] - target[s]).square().sum()) for s in SIDES)
    return torch.autograd.grad(objective, [synthetic.images, synthetic.texts])


@pytest.mark.parametrize("start", [0, 2])
def test_the_recorded_gradient_is_the_matchers_exact_one(start):
    model, synthetic, expert = tiny_problem()
    batches = [torch.tensor([0, 2, 4, 5]), torch.tensor([1, 3, 0, 2]), torch.tensor([5, 4, 1, 3])]
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("InfoNCE"), syn_steps=3, keep_graphs=0)
    images, texts, loss = study.matching_gradient(matcher, synthetic, expert, start, 1, batches, torch.device("cpu"), 7)
    begin = {s: expert.flat(s, start) for s in SIDES}
    target = {s: expert.flat(s, start + 1) for s in SIDES}
    want_images, want_texts = by_hand_gradient(model, synthetic, begin, target, batches, 7)
    for got, want, entry in ((images, want_images.flatten(), 3 * 192 + 100), (texts, want_texts.flatten(), 5 * 7 + 4)):
        assert want[entry].abs() > 0, "a zero reference entry would prove nothing"
        assert got[entry].item() == pytest.approx(want[entry].item(), rel=1e-9)
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)
    # a second call from the same start gives the same gradient (fresh .grad, same dropout draw)
    again = study.matching_gradient(matcher, synthetic, expert, start, 1, batches, torch.device("cpu"), 7)
    assert torch.equal(again[0], images) and again[2] == loss


def test_cosine_matrix_and_its_off_diagonal_mean():
    vectors = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, -2.0])]
    matrix = study.cosine_matrix(vectors)
    r = 2 ** -0.5
    expected = [[1, r, 0], [r, 1, -r], [0, -r, 1]]
    assert all(matrix[i][j] == pytest.approx(expected[i][j]) for i in range(3) for j in range(3))
    assert study.mean_off_diagonal(matrix) == pytest.approx((2 * r + 0 - 2 * r) / 6)


@pytest.fixture(scope="module")
def smoke_work(tmp_path_factory):
    return tmp_path_factory.mktemp("study")


def run_study(work, name, *extra):
    done = subprocess.run(["bash", "sh/study.sh", name, "--workdir", str(work), "--preset", "smoke", *extra],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = [line.split("report: ", 1)[1] for line in done.stdout.splitlines() if line.startswith("report: ")]
    folder = Path(report).parent
    return folder, Path(report).read_text(), json.loads((folder / "results.json").read_text())


def assert_pngs(folder, *names):
    for name in names:
        assert (folder / name).read_bytes()[:8] == PNG, name


@pytest.mark.slow
def test_teacher_stage_study(smoke_work):
    folder, text, payload = run_study(smoke_work, "teacher_stage")
    assert_pngs(folder, "teacher_stage.png")
    assert payload["windows"] == [0, 1, 2] and len(payload["per_seed"]) == 3
    assert "| [0, 2) |" in text and "| [2, 4) |" in text and "bash sh/study.sh teacher_stage" in text
    runs = list((smoke_work / "study_runs" / "shapes").glob("lors_w*_b4_s0_*"))
    assert len(runs) == 3
    recorded = json.loads((sorted(runs)[0] / "args.json").read_text())
    assert (recorded["min_start_epoch"], recorded["max_start_epoch"]) == ([0], [2])


@pytest.mark.slow
def test_gradients_study(smoke_work):
    folder, text, payload = run_study(smoke_work, "gradients")
    assert_pngs(folder, "gradient_norm_image.png", "gradient_norm_text.png", "gradient_cosine.png")
    for kind in ("normal", "shortcut"):
        starts = payload[kind]["starts"]
        assert starts == [0, 1, 2, 3]  # 4-epoch experts, target = start + 1
        for side in ("image", "text"):
            matrix = payload[kind][side]["cosine"]
            assert all(matrix[i][i] == pytest.approx(1.0) for i in range(len(starts)))
            assert all(matrix[i][j] == pytest.approx(matrix[j][i]) for i in range(4) for j in range(4))
            assert all(mean > 0 for mean, _ in payload[kind][side]["norm"])
    assert Path(payload["folders"]["shortcut"]).name == "convexified_0_5"


@pytest.mark.slow
def test_components_study(smoke_work):
    folder, text, payload = run_study(smoke_work, "components")
    assert_pngs(folder, "components.png")
    for row in ("BASE", "+EMA", "+PTM (equal)", "+ST", "PTM+ST (equal)", "+PTM (per-phase)", "PTM+ST (per-phase)"):
        assert f"| {row} |" in text
    runs = smoke_work / "study_runs" / "shapes"
    base = json.loads(next(runs.glob("base_b4_s0_*")).joinpath("args.json").read_text())
    ema = json.loads(next(runs.glob("lors_b4_s0_*")).joinpath("args.json").read_text())
    shortcut = json.loads(next(runs.glob("st_b4_s0_*")).joinpath("args.json").read_text())
    equal = json.loads(next(runs.glob("ptmst_equal_b4_s0_*")).joinpath("args.json").read_text())
    per_phase = json.loads(next(runs.glob("ptmst_per-phase_b4_s0_*")).joinpath("args.json").read_text())
    ptm = json.loads(next(runs.glob("ptm_equal_b4_s0_*")).joinpath("args.json").read_text())
    assert base["ema_decay"] == 0 and ema["ema_decay"] > 0
    assert "convexified" in shortcut["buffer_path"][0] and "convexified" not in ema["buffer_path"][0]
    assert sum(equal["Iteration"]) == base["Iteration"][0] == 2 and per_phase["Iteration"] == [2, 2]
    assert all(path.endswith("normal") for path in ptm["buffer_path"]) and ptm["subset_num"] == 2
    sizes = {(entry["row"], entry["budget"]): entry["per_seed"] for entry in payload["step_sizes"]}
    assert len(sizes[("BASE", 4)][0]) == 1 and len(sizes[("PTM+ST (equal)", 4)][0]) == 2  # one pair per phase
    assert "| PTM+ST (per-phase) | 4 |" in text


def test_learned_step_sizes_are_averaged_over_seeds_per_phase():
    lines = study.learned_step_sizes({("PTM+ST", 40): [[(0.1, 0.2), (0.3, 0.4)], [(0.2, 0.4), (0.5, 0.6)]]}, 0.1, 0.1)
    assert "| PTM+ST | 40 | 0.150 / 0.300, 0.400 / 0.500 |" in lines


@pytest.mark.slow
def test_schedule_study_reuses_the_components_runs(smoke_work):
    before = set((smoke_work / "study_runs" / "shapes").iterdir())
    folder, text, payload = run_study(smoke_work, "schedule")
    assert_pngs(folder, "schedule.png")
    for label in ("paper", "own", "restart", "union"):
        assert f"| PTM-ST | {label} |" in text and f"| random, split | {label} |" in text
    assert set((smoke_work / "study_runs" / "shapes").iterdir()) == before  # PTM-ST and LoRS runs reused
    schedules = {(row["set"], row["schedule"]) for row in payload["per_seed"]}
    assert ("LoRS (one phase)", "paper") in schedules and len(schedules) == 9


@pytest.mark.slow
def test_scale_study_at_smoke_size_reports_phases_against_one_phase_and_resumes(tmp_path):
    folder, text, payload = run_study(tmp_path, "scale")
    assert_pngs(folder, "recall_vs_budget.png")
    assert payload["budgets"] == [4, 110] and payload["phase_sizes"] == {"4": [4], "110": [55, 55]}
    assert payload["rows"] == ["mttvl", "lors", "ptmst", "ptmst, one phase", "random", "random, split like PTM-ST",
                               "full training set"]
    runs = tmp_path / "study_runs" / "scale" / "shapes"
    # at 4 pairs PTM-ST as published is one phase: the one-phase row is that very run, reused
    assert len(list(runs.glob("ptmst_b4_s0_*"))) == 1 and len(list(runs.glob("ptmst_b110_s0_*"))) == 2
    phased = [RunFolder(f) for f in runs.glob("ptmst_b110_s0_*")]
    assert sorted(len(r.recorded_args()["num_queries"]) for r in phased) == [1, 2]
    assert "| 110 | 55 + 55 |" in text and "| 4 | 4 | (the same run) |" in text
    for protocol in ("val", "paper"):
        cells = payload["table"]
        assert set(cells) >= {f"ptmst, one phase|110|{protocol}", f"full training set|4|{protocol}"}
    # the payoff row is the per-seed difference of the two rows' recalls, as printed
    per = {(r["row"], r["budget"]): r["val"]["selected"]["mean"]["r_mean"] for r in payload["per_seed"]}
    assert f"| 110 | 55 + 55 | {per[('ptmst', 110)] - per[('ptmst, one phase', 110)]:.2f} ± 0.00 |" in text
    assert len(list(runs.glob("*/students_*.json"))) == 7  # one per run folder: 8 rows, 7 runs
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    again_folder, again_text, again = run_study(tmp_path, "scale")
    assert again["table"] == payload["table"]  # nothing retrained: the same figures from the kept runs and students
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, message", [
    (["components", "--preset", "quick"], "--preset quick is the scale study's"),
    (["scale", "--dataset", "stamps"], "--dataset stamps: the scale study generates its own"),
    (["scale", "--windows", "1"], "--windows is the teacher_stage study's flag"),
    (["teacher_stage", "--windows", "9"], "--windows 9: a window [w, w + 2) needs snapshot w + 2"),
    (["components", "--seed", "3"], "--seed is set by the study itself"),
    (["components", "--ema_decay", "0.5"], "--ema_decay is set by the study itself"),
    (["schedule", "--nope", "1"], "--nope is neither a study flag nor a flag of distill_ptm-st.py"),
    (["nonsense"], "invalid choice"),
    (["components", "--iterations", "0"], "--iterations"),
    (["teacher_stage", "--width", "0"], "--width"),
    (["schedule", "--seeds", "-1"], "--seeds"),
    (["gradients", "--experts", "two"], "--experts"),
])
def test_bad_study_flags_name_the_flag(argv, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "distill_utils.app.study", *argv, "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_budget_larger_than_a_folder_datasets_training_split_stops_the_study_before_any_expert(tmp_path):
    from distill_utils.runtime.errors import UsageError
    from tests.test_folder_data import make_folder
    images = make_folder(tmp_path / "images", n=12)  # 7 training pairs
    with pytest.raises(UsageError, match="--budgets 40 exceeds the 7 training pairs of folder"):
        study.main(["components", "--workdir", str(tmp_path / "work"), "--preset", "smoke", "--budgets", "4", "40",
                    "--dataset", "folder", "--image_root", str(images), "--ann_root", str(tmp_path / "ann")])
    assert not (tmp_path / "work" / "buffer").exists()  # no expert was trained first
