"""A reduced quick start (a handful of steps) runs every stage and writes the report."""
import pytest

from distill_utils.app import quickstart


@pytest.mark.slow
def test_smoke_quickstart_writes_the_report(tmp_path, capsys):
    report = quickstart.main(["--workdir", str(tmp_path), "--preset", "smoke"])
    text = report.read_text()
    assert "| method | Img R@1 |" in text and "random real subset (8 pairs)" in text and "full training set" in text
    assert "Distilled minus random subset" in text and "| total |" in text
    folder = report.parent
    for k in (0, 1):
        for tag in ("before", "after"):
            assert (folder / f"phase{k}_{tag}.png").stat().st_size > 0
            assert len((folder / f"phase{k}_{tag}_captions.txt").read_text().splitlines()) == 4
    assert (folder / "eval_results.json").is_file()
    assert "report:" in capsys.readouterr().out
    # a rerun reuses the data and the experts, and starts a new run
    again = quickstart.main(["--workdir", str(tmp_path), "--preset", "smoke", "--seed", "1"])
    assert again != report and again.is_file()


@pytest.mark.slow
def test_eval_coresets_and_another_student_on_a_quickstart_run(tmp_path):
    """The issue's commands, as a user types them, on a (smoke) quick-start run."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    quickstart.main(["--workdir", str(tmp_path), "--preset", "smoke"])
    (run,) = (tmp_path / "logged_files" / "shapes").glob("quickstart_*")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}

    def eval_py(*flags):
        return subprocess.run([sys.executable, "eval.py", "--run", str(run), "--num_eval", "1",
                               "--epoch_eval_train", "2", *flags], cwd=root, env=env, capture_output=True, text=True)
    done = eval_py("--baseline", "random", "herding", "kcenter", "forgetting")
    assert done.returncode == 0, done.stderr[-2000:]
    table = (run / "eval_results.md").read_text()
    for row in ("random real subset (8 pairs)", "herding coreset (8 pairs)", "k-center coreset (8 pairs)",
                "forgetting coreset (8 pairs)"):
        assert f"| {row} |" in table
    done = eval_py("--student_image_encoder", "convnet_tiny")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "student convnet_tiny, 16 px" in (run / "eval_results_student_convnet_tiny.md").read_text()
    refused = eval_py("--student_image_encoder", "convnet", "--student_text_encoder", "bert")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr and "text encoder" in refused.stderr
