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
