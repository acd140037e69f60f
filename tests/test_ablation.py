"""sh/ablation.sh end to end at smoke size: every method distilled and evaluated, one report."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_utils.runtime import checkpoint
from distill_utils.app import ablation
from distill_utils.runtime.runs import RunFolder
from distill_utils.pipeline import sweep
from distill_utils.pipeline import reports

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("mttvl", "lors", "ptmst", "amd", "repblend")
ROWS = METHODS + ("random", "random, frozen encoder", "random, split like PTM-ST", "herding", "kcenter", "forgetting",
                  "full training set")


def run_of(work: Path, method: str, budget: int = 4, seed: int = 0) -> Path:
    """The one run folder of a method, budget and seed (its name ends in its flags' fingerprint)."""
    (folder,) = (work / "ablation_runs" / "shapes").glob(f"{method}_b{budget}_s{seed}_*")
    return folder


def report_runs(report: Path):
    return [Path(line[3:-1]) for line in report.read_text().splitlines() if line.startswith("- `")]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablation")
    report = ablation.main(["--workdir", str(work), "--preset", "smoke", "--syn_steps", "1", "--students", "convnet"])
    return work, report


@pytest.mark.slow
def test_the_report_holds_every_method_both_protocols_a_plot_and_images(smoke_report):
    work, report = smoke_report
    text = report.read_text()
    for method in ROWS:
        assert len(re.findall(rf"^\| {method} \| \d+\.\d\d ± \d+\.\d\d \|$", text, re.M)) == 2, method  # val + paper
        # the papers' layout: 7 recalls of the budget, val and paper protocol
        assert len(re.findall(rf"^\| {method} \|( \d+\.\d ± \d+\.\d \|){{7}}$", text, re.M)) >= 2, method
    assert "| method | 4 pairs: IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | mean |" in text
    assert "## Learning-rate search" in text and "None for any method" in text
    for plot in ("recall_vs_budget.png", "cross_architecture.png"):
        assert (report.parent / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in text
    assert not list(report.parent.glob("*.svg"))
    # cross-architecture: every set but the frozen-encoder reference trained by the convnet student
    assert "| method | 4 pairs: distiller's model | convnet |" in text
    for row in METHODS + ("random", "random, split like PTM-ST", "herding", "kcenter", "forgetting"):
        assert len(re.findall(rf"^\| {row} \| \d+\.\d\d ± \d+\.\d\d \| \d+\.\d\d ± \d+\.\d\d \|$", text,
                              re.M)) == 2, row
    images = sorted(p.name for p in (report.parent / "images").iterdir())
    assert images == sorted(f"{m}_b4_phase0.png" for m in METHODS)  # PTM-ST at 4 pairs: one phase, as published
    results = json.loads((report.parent / "results.json").read_text())
    assert {(r["method"], r["budget"], r["seed"]) for r in results["results"] if r["student"] is None} == {
        (m, 4, 0) for m in ROWS}
    assert {r["method"] for r in results["results"] if r["student"] == "convnet"} == \
        set(ROWS) - {"random, frozen encoder", "full training set"}
    assert not list((work / "reports").glob(".*partial"))
    from distill_utils.outputs import export
    assert sorted(p.name for p in (report.parent / "exports").iterdir()) == sorted(f"{m}_b4_s0" for m in METHODS)
    lors, _ = export.load_export(report.parent / "exports" / "lors_b4_s0")
    assert torch.equal(lors[0].images, sweep.load_final(run_of(work, "lors"))[0].images)
    card = (report.parent / "exports" / "lors_b4_s0" / "README.md").read_text()
    val = next(r for r in results["results"] if r["method"] == "lors" and r["student"] is None)["val"]
    assert f"{val['selected']['mean']['r_mean']:.2f} ± " in card and "val protocol" in card
    seconds = {m: float(re.search(rf"^\| {m} \| (\d+) \|", text, re.M).group(1)) for m in METHODS}
    recorded = {m: json.loads((run_of(work, m) / "ablation_seconds.json").read_text()) for m in METHODS}
    for method in METHODS:
        assert seconds[method] == round(recorded[method]["seconds"]) and recorded[method]["seconds"] > 0


@pytest.mark.slow
def test_every_method_ran_with_its_flags_at_equal_budget_and_iterations(smoke_report):
    work, _ = smoke_report
    recorded = {m: RunFolder(run_of(work, m)).recorded_args() for m in METHODS}
    for method, args in recorded.items():
        assert args["method"] == method
        assert args["num_queries"] == [4] and args["Iteration"] == [4]  # smoke: 2 + 2 iterations, one phase
        assert args["ema_decay"] == (0.99 if method == "ptmst" else 0.0)
        assert args["syn_steps"] == 1  # a pass-through flag reached every run
    assert recorded["ptmst"]["subset_num"] == 1 and "convexified" in recorded["ptmst"]["buffer_path"][0]
    assert recorded["repblend"]["image_trainable"] is False and recorded["repblend"]["match_norm"] == "joint"
    assert "frozen" in recorded["repblend"]["buffer_path"][0]
    mttvl, _ = checkpoint.load_distilled(run_of(work, "mttvl") / "distilled_0_4.pt")
    assert torch.equal(mttvl.similarity, torch.eye(4))
    assert recorded["amd"]["pair_init"] == "prototype" and recorded["amd"]["async_starts"] == "dynamic"


@pytest.mark.slow
def test_a_second_call_reuses_every_finished_run(smoke_report, monkeypatch):
    work, first = smoke_report
    histories = {p: p.read_text() for p in (work / "ablation_runs" / "shapes").glob("*/args_history.jsonl")}

    def trains_again(*_):
        raise AssertionError("a kept set or reference row trained again")
    monkeypatch.setattr(sweep, "students", trains_again)
    monkeypatch.setattr(sweep, "full_rows", trains_again)
    report = ablation.main(["--workdir", str(work), "--preset", "smoke", "--syn_steps", "1", "--students", "convnet"])
    assert report.is_file()
    assert {p: p.read_text() for p in histories} == histories  # no run started again
    assert sorted(report_runs(report)) == sorted(run_of(work, m) for m in METHODS)
    again, before = (json.loads((r.parent / "results.json").read_text()) for r in (report, first))
    assert again["results"] == before["results"] and again["eval_seconds"] == before["eval_seconds"]


@pytest.mark.slow
def test_a_changed_flag_makes_new_runs_and_the_report_shows_them(smoke_report):
    """The flag reaches the runs the report is built from; the earlier runs are left as they were."""
    work, first = smoke_report
    histories = {p: p.read_text() for p in (work / "ablation_runs" / "shapes").glob("*/args_history.jsonl")}
    report = ablation.main(["--workdir", str(work), "--preset", "smoke", "--syn_steps", "1", "--lr_img", "0.05",
                            "--batch_size_train", "16", "--methods", "lors", "ptmst"])
    runs = report_runs(report)
    assert len(runs) == 2 and not set(runs) & set(report_runs(first))
    for folder in runs:
        recorded = RunFolder(folder).recorded_args()
        assert recorded["lr_img"] == 0.05 and recorded["syn_steps"] == 1
        experts = json.loads((Path(recorded["buffer_path"][0]).parents[3] / "flags.json").read_text())
        assert experts["batch_size_train"] == 16  # new experts too: a buffer.py flag changed
    assert {p: p.read_text() for p in histories} == histories
    assert "--lr_img 0.05" in report.read_text()


@pytest.mark.slow
def test_two_calls_in_the_same_second_keep_both_reports(smoke_report, monkeypatch):
    work, _ = smoke_report
    monkeypatch.setattr(ablation, "report_stamp", lambda: "20000101_000000")
    first = ablation.main(["--workdir", str(work), "--preset", "smoke", "--syn_steps", "1"])
    second = ablation.main(["--workdir", str(work), "--preset", "smoke", "--syn_steps", "1"])
    assert first.parent.name == "ablation_20000101_000000" and second.parent.name == "ablation_20000101_000000_2"
    assert first.is_file() and second.is_file()
    assert not list((work / "reports").glob(".*partial"))


@pytest.mark.slow
def test_any_dataset_through_pass_through_flags(shapes_root, tmp_path):
    """--dataset (here the tests' own shapes folder, random weights) replaces the built-in data and its
    pretraining; buffer.py's own flags reach the experts."""
    report = ablation.main(["--workdir", str(tmp_path), "--preset", "smoke", "--methods", "lors", "repblend",
                            "--dataset", "shapes", "--image_root", str(shapes_root), "--ann_root", str(shapes_root),
                            "--image_pretrained", "false", "--batch_size_train", "16", "--syn_steps", "1"])
    assert not (tmp_path / "data").exists() and not (tmp_path / "checkpoints").exists()
    recorded = RunFolder(run_of(tmp_path, "lors")).recorded_args()
    assert recorded["image_root"] == str(shapes_root) and recorded["image_pretrained"] is False
    (meta_path,) = (tmp_path / "buffer").glob("*/shapes/convnet_tiny_tiny_bert/InfoNCE_NoAug/normal/meta.json")
    meta = json.loads(meta_path.read_text())
    assert meta["image_pretrained"] is False
    assert "| lors |" in report.read_text() and "| repblend |" in report.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--no_such_flag", "1"], "--no_such_flag is neither an ablation flag nor a flag of distill_ptm-st.py"),
    (["--budgets", "1", "--ptmst_layout", "even"], "every budget must be at least 2"),
    (["--budgets", "0"], "--budgets 0: a budget is a number of pairs, at least 1"),
    (["--seed", "3"], "--seed is set by the ablation itself"),
    (["--methods", "nope"], "invalid choice"),
    (["--coresets", "greedy"], "invalid choice"),
    (["--coresets"], "--coresets: expected at least one argument"),  # a bare flag never means "none"
    (["--coresets", "none", "herding"], "'none' means no coreset row"),
    (["--students", "no_such_net"], "--students 'no_such_net' is neither built in"),
    (["--students", "convnet", "convnet"], "--students names convnet more than once"),
    (["--lr_search", "2", "--lr_img", "3"], "--lr_img is what --lr_search searches"),
    (["--lr_search", "-1"], "--lr_search -1: give the number of configurations"),
])
def test_bad_ablation_flags_name_the_flag(argv, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "distill_utils.app.ablation", "--workdir", str(tmp_path), *argv],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def fake_results(rows, budgets, seeds, students=()):
    results = {}
    for r, row in enumerate(rows):
        for b in budgets:
            for seed in seeds:
                for student in (None, *students):
                    value = 10.0 * r + b + seed + (0.5 if student else 0.0)
                    summary = {"selected": {"mean": {k: value for k in ("img_r1", "img_r5", "img_r10", "txt_r1",
                                                                         "txt_r5", "txt_r10", "r_mean")}}}
                    key = (row, b, seed) + ((student,) if student else ())
                    results[key] = {"val": summary, "paper": summary}
    return results


def test_plots_are_matplotlib_pngs_of_every_row(tmp_path, monkeypatch):
    from matplotlib import image as mpimg
    plan = ablation.Plan(seeds=(0, 1), budgets=(4, 8), methods=("lors",), coresets=("herding",),
                         students=("convnet",))
    rows = ["lors", "random", "herding"]
    results = fake_results(rows, plan.budgets, plan.seeds, plan.students)
    drawn = {}
    original = reports.lines_with_error_bars

    def spy(path, xs, series, *rest):
        drawn.update(series)
        original(path, xs, series, *rest)
    monkeypatch.setattr(reports, "lines_with_error_bars", spy)
    names = ablation.draw_plots(plan, results, tmp_path, rows)
    assert names == ["recall_vs_budget.png", "cross_architecture.png"]
    # lors at budget 8: (0 + 8 + 0, 0 + 8 + 1) over seeds -> mean 8.5, std 0.5
    assert drawn["lors"] == [(4.5, 0.5), (8.5, 0.5)] and list(drawn) == rows
    for name in names:
        height, width, _ = mpimg.imread(tmp_path / name).shape
        assert height > 100 and width > 100
    table = ablation.paper_table(plan, results, "val", rows)
    assert table.splitlines()[0].startswith("| method | 4 pairs: IR@1 | IR@5 |") and "| 8 pairs: IR@1 |" in table
    assert "| herding | " + " | ".join(["24.5 ± 0.5"] * 7 + ["28.5 ± 0.5"] * 7) + " |" in table
    cross = ablation.cross_table(plan, results, "val", rows)
    assert "| random | 14.50 ± 0.50 | 15.00 ± 0.50 | 18.50 ± 0.50 | 19.00 ± 0.50 |" in cross


def test_search_configurations_are_fixed_and_start_at_the_presets_rates():
    s = ablation.PRESETS["default"].quickstart
    configs = sweep.search_configs(s, 5)
    assert configs == sweep.search_configs(s, 5) and len({tuple(c.values()) for c in configs}) == 5
    assert configs[0] == {"lr_img": s.lr_img, "lr_txt": s.lr_txt, "lr_lr": s.lr_lr}
    for c in configs[1:]:
        assert s.lr_img / 4 <= c["lr_img"] <= s.lr_img * 4 and s.lr_txt / 4 <= c["lr_txt"] <= s.lr_txt * 4
        assert s.lr_lr / 10 <= c["lr_lr"] <= s.lr_lr * 10
    assert sweep.search_configs(s, 2) == configs[:2]


@pytest.mark.slow
def test_lr_search_gives_every_method_the_same_configurations_and_runs_the_val_choice(tmp_path, monkeypatch):
    """Each method and budget distils every configuration at the search's own seed; the configuration
    with the best val score (the cells the report shows) is the one the reported seeds ran with."""
    report = ablation.main(["--workdir", str(tmp_path), "--preset", "smoke", "--methods", "lors", "ptmst",
                            "--coresets", "none", "--syn_steps", "1", "--lr_search", "3"])
    payload = json.loads((report.parent / "results.json").read_text())
    searches = payload["lr_search"]
    assert {(s["method"], s["budget"]) for s in searches} == {("lors", 4), ("ptmst", 4)}
    assert searches[0]["configs"] == searches[1]["configs"] and len(searches[0]["configs"]) == 3
    runs = tmp_path / "ablation_runs" / "shapes"
    for found in searches:
        assert found["chosen"] == max(range(3), key=lambda k: (found["scores"][k], -k))
        for k, config in enumerate(found["configs"]):
            (folder,) = runs.glob(f"search{k}_{found['method']}_b4_*")
            recorded = RunFolder(folder).recorded_args()
            assert recorded["seed"] == ablation.SEARCH_SEED and recorded["lr_img"] == config["lr_img"]
        chosen = found["configs"][found["chosen"]]
        final = RunFolder(run_of(tmp_path, found["method"])).recorded_args()
        assert (final["lr_img"], final["lr_txt"], final["lr_lr"]) == (chosen["lr_img"], chosen["lr_txt"],
                                                                         chosen["lr_lr"])
    text = report.read_text()
    assert "tried the same 3 configurations" in text and "**" in text
    assert "chose from the same search" in text and "with the same learning rates" not in text


def test_a_budget_larger_than_a_folder_datasets_training_split_stops_before_any_expert(tmp_path):
    from tests.test_folder_data import make_folder
    from distill_utils.runtime.errors import UsageError
    images = make_folder(tmp_path / "images", n=12)  # 12 - 2 val - 3 test = 7 training pairs
    with pytest.raises(UsageError, match="--budgets 50 exceeds the 7 training pairs of folder"):
        ablation.main(["--workdir", str(tmp_path / "work"), "--preset", "smoke", "--budgets", "4", "50",
                       "--dataset", "folder", "--image_root", str(images), "--ann_root", str(tmp_path / "ann")])
    assert not (tmp_path / "work" / "buffer").exists()  # no expert was trained first
