"""sh/ablation.sh end to end at smoke size: every method distilled and evaluated, one report."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_utils import checkpoint
from distill_utils.app import ablation
from distill_utils.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("mttvl", "lors", "ptmst", "amd", "repblend")


def run_of(work: Path, method: str, budget: int = 4, seed: int = 0) -> Path:
    """The one run folder of a method, budget and seed (its name ends in its flags' fingerprint)."""
    (folder,) = (work / "ablation_runs" / "shapes").glob(f"{method}_b{budget}_s{seed}_*")
    return folder


def report_runs(report: Path):
    return [Path(line[3:-1]) for line in report.read_text().splitlines() if line.startswith("- `")]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablation")
    report = ablation.main(["--workdir", str(work), "--preset", "smoke", "--syn_steps", "1"])
    return work, report


@pytest.mark.slow
def test_the_report_holds_every_method_both_protocols_a_plot_and_images(smoke_report):
    work, report = smoke_report
    text = report.read_text()
    for method in METHODS + ("random", "random, frozen encoder"):
        assert len(re.findall(rf"^\| {method} \| \d+\.\d\d ± \d+\.\d\d \|$", text, re.M)) == 2, method  # val + paper
    assert "## Learning-rate search" in text and "None for any method" in text
    svg = (report.parent / "recall_vs_budget.svg").read_text()
    assert svg.count("<polyline") == len(METHODS) + 2
    images = sorted(p.name for p in (report.parent / "images").iterdir())
    assert images == sorted([f"{m}_b4_phase0.png" for m in METHODS] + ["ptmst_b4_phase1.png"])
    results = json.loads((report.parent / "results.json").read_text())
    assert {(r["method"], r["budget"], r["seed"]) for r in results["results"]} == {(m, 4, 0) for m in METHODS + ("random", "random, frozen encoder")}
    assert not list((work / "reports").glob(".*partial"))
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
        assert sum(args["num_queries"]) == 4 and sum(args["Iteration"]) == 4  # smoke: 2 phases x 2 iterations
        assert args["syn_steps"] == 1  # a pass-through flag reached every run
    assert recorded["ptmst"]["subset_num"] == 2 and "convexified" in recorded["ptmst"]["buffer_path"][0]
    assert recorded["repblend"]["image_trainable"] is False and recorded["repblend"]["match_norm"] == "joint"
    assert "frozen" in recorded["repblend"]["buffer_path"][0]
    mttvl, _ = checkpoint.load_distilled(run_of(work, "mttvl") / "distilled_0_4.pt")
    assert torch.equal(mttvl.similarity, torch.eye(4))
    assert recorded["amd"]["pair_init"] == "prototype" and recorded["amd"]["async_starts"] == "dynamic"


@pytest.mark.slow
def test_a_second_call_reuses_every_finished_run(smoke_report):
    work, _ = smoke_report
    histories = {p: p.read_text() for p in (work / "ablation_runs" / "shapes").glob("*/args_history.jsonl")}
    report = ablation.main(["--workdir", str(work), "--preset", "smoke", "--syn_steps", "1"])
    assert report.is_file()
    assert {p: p.read_text() for p in histories} == histories  # no run started again
    assert sorted(report_runs(report)) == sorted(run_of(work, m) for m in METHODS)


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
    (["--budgets", "1"], "every budget must be at least 2"),
    (["--seed", "3"], "--seed is set by the ablation itself"),
    (["--methods", "nope"], "invalid choice"),
])
def test_bad_ablation_flags_name_the_flag(argv, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "distill_utils.app.ablation", "--workdir", str(tmp_path), *argv],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
