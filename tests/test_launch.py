"""The cluster launcher (``--launcher slurm|submitit_local``): submitit job arrays, reuse, failures, kills.

Without a cluster, submitit's local executor runs every job as a process of its own, exactly as Slurm would
run it from the shared workdir; the Slurm side is checked down to the sbatch file submitit writes.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from distill_utils.pipeline import launch, sweep
from distill_utils.runtime.errors import UsageError
from distill_utils.runtime.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Twice:
    value: int
    label: str = "twice"

    def __call__(self):
        return self.value * 2, os.getpid()


@dataclass
class Fails:
    label: str = "the planted failure"

    def __call__(self):
        raise RuntimeError("planted: this job cannot finish")


@dataclass
class AlreadyDone:
    label: str = "done earlier"

    def done(self):
        return True

    def __call__(self):
        return "read here", os.getpid()


@dataclass
class Sleeps:
    seconds: float
    label: str = "sleeps"

    def __call__(self):
        began = time.time()
        time.sleep(self.seconds)
        return began, time.time()


@dataclass
class Threads:
    label: str = "threads"

    def __call__(self):
        import torch
        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


def local_launcher(tmp_path, **options):
    return launch.launcher_for("submitit_local", tmp_path, launch.ClusterOptions(**options))


def test_each_job_runs_in_a_process_of_its_own_and_a_done_one_is_not_submitted(tmp_path):
    launcher = local_launcher(tmp_path)
    results = launcher.run("stage", [Twice(1), AlreadyDone(), Twice(5)])
    assert [r[0] for r in results] == [2, "read here", 10]
    assert results[1][1] == os.getpid()  # its result is on disk: read here, not submitted
    assert len({results[0][1], results[2][1], os.getpid()}) == 3
    # stdout and stderr of every submitted job under the workdir, one folder per job
    logs = sorted(p.name for p in (tmp_path / "jobs" / "stage").rglob("*_log.*"))
    assert len(logs) == 4 and not (tmp_path / "jobs" / "stage" / "%j").exists()


def test_waves_keep_at_most_max_parallel_local_jobs(tmp_path):
    launcher = local_launcher(tmp_path, max_parallel=1)
    assert [r[0] for r in launcher.run("stage", [Twice(k) for k in range(3)])] == [0, 2, 4]
    assert len(list((tmp_path / "jobs" / "stage").iterdir())) == 3  # three submissions of one job each


def test_the_next_local_job_starts_when_one_ends_not_when_its_whole_wave_has(tmp_path):
    launcher = local_launcher(tmp_path, max_parallel=2)
    launcher.poll_s = 0.1
    submissions = []  # (when, how many jobs)
    submit = launcher.submit

    def recorded(stage, batch, beside):
        submissions.append((time.time(), len(batch), beside))
        return submit(stage, batch, beside)
    launcher.submit = recorded
    (_, slow_end), (_, quick_end), _ = launcher.run("stage", [Sleeps(8.0), Sleeps(0.1), Sleeps(0.1)])
    (_, first, beside_first), (third_submitted, second, beside_third) = submissions
    assert (first, second) == (2, 1)  # two at once, never three
    assert (beside_first, beside_third) == (0, 1)  # the third shares the cores with the slow one
    assert quick_end < third_submitted < slow_end  # it took the quick job's place while the slow one ran


def test_local_jobs_side_by_side_share_the_cores_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    share = launch.cpu_share(2)
    assert share == max(1, cores // 2)
    assert local_launcher(tmp_path / "a", max_parallel=2).run("stage", [Threads(), Threads()]) == [
        (str(share), share)] * 2
    # a stage of one job (the experts) has no job beside it: it takes every core
    assert local_launcher(tmp_path / "c", max_parallel=2).run("stage", [Threads()]) == [(str(cores), cores)]
    assert "OMP_NUM_THREADS" not in os.environ  # this process is left as it was
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torch takes at most one thread per core
    assert local_launcher(tmp_path / "b", max_parallel=2).run("stage", [Threads()]) == [("2", min(2, cores))]


def test_a_failing_job_is_named_with_its_log_and_listed_for_the_next_call(tmp_path):
    launcher = local_launcher(tmp_path)
    with pytest.raises(UsageError) as error:
        launcher.run("distill", [Twice(1), Fails()])
    message = str(error.value)
    assert "1 job did not finish: the planted failure" in message
    assert "planted: this job cannot finish" in message and "run the same command again" in message
    stderr = re.search(r"stderr (\S+_log\.err)", message).group(1)
    assert "planted: this job cannot finish" in Path(stderr).read_text()
    listed = tmp_path / "jobs" / launch.FAILED_FILE
    assert "| distill | the planted failure |" in listed.read_text()
    assert json.loads(listed.with_suffix(".json").read_text())[0]["label"] == "the planted failure"
    local_launcher(tmp_path)  # the next call starts with no list of the last one's failures
    assert not listed.exists()


def fake_slurm_commands(folder: Path, monkeypatch) -> None:
    """``sbatch`` and ``srun`` on PATH (never run here): what submitit looks for to build a Slurm executor."""
    folder.mkdir()
    for name in ("sbatch", "srun"):
        (folder / name).write_text("#!/bin/sh\nexit 1\n")
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_slurm_parameters_reach_the_sbatch_file(tmp_path, monkeypatch):
    fake_slurm_commands(tmp_path / "bin", monkeypatch)
    options = launch.ClusterOptions(partition="gpu", gpus=1, time_min=90, max_parallel=4,
                                    params=(("slurm_mem", "32G"), ("cpus_per_task", 8)))
    launcher = launch.launcher_for("slurm", tmp_path, options)
    assert launcher.name == "slurm"
    executor = launcher.executor("distill")
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=90", "#SBATCH --mem=32G",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --job-name=ptmst_distill"):
        assert line in text, line
    assert str(tmp_path / "jobs" / "distill") in text  # logs under the workdir
    assert executor._executor.parameters.get("array_parallelism") == 4


@pytest.mark.parametrize("flags, message", [
    (["--slurm_param", "mem"], "--slurm_param mem: give KEY=VALUE"),
    (["--slurm_param", "slurm_nonsense=1"], "--slurm_param: submitit refuses these parameters"),
    (["--slurm_time", "0"], "--slurm_time"),
    (["--launcher", "pbs"], "invalid choice"),
])
def test_bad_launcher_flags_name_the_flag(tmp_path, flags, message):
    done = subprocess.run([sys.executable, "-m", "distill_utils.app.ablation", "--workdir", str(tmp_path),
                           "--preset", "smoke", "--launcher", "submitit_local", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-800:]


def test_slurm_without_sbatch_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(UsageError, match="sbatch is not on PATH.*submitit_local"):
        launch.launcher_for("slurm", tmp_path, launch.ClusterOptions())


def test_a_preempted_distillation_requeues_itself(tmp_path):
    job = sweep.Distillation(work=None, run=str(tmp_path / "run"), flags=["--seed", "0"], label="run 1/1")
    again = job.checkpoint()
    assert type(again).__name__ == "DelayedSubmission" and again.function is job and again.args == ()


SMOKE = ["--preset", "smoke", "--syn_steps", "1"]


def results_cells(report: Path):
    payload = json.loads((report.parent / "results.json").read_text())
    return {(r["method"], r["budget"], r["seed"], r["student"]): (r["val"], r["paper"]) for r in payload["results"]}


@pytest.mark.slow
def test_submitit_local_gives_the_local_cells_bit_for_bit(tmp_path):
    from distill_utils.app import ablation
    local = ablation.main(["--workdir", str(tmp_path / "local"), *SMOKE, "--students", "convnet"])
    jobs = ablation.main(["--workdir", str(tmp_path / "jobs"), *SMOKE, "--students", "convnet",
                          "--launcher", "submitit_local"])
    assert results_cells(jobs) == results_cells(local) and len(results_cells(local)) == 22
    # every distillation and every set's students ran as a job of its own
    assert len(list((tmp_path / "jobs" / "jobs" / "distill").glob("*/*_log.err"))) == 5
    # 5 sets, then one job per reference row: random, random beside RepBlend's frozen encoder, split, 3 coresets, full
    assert len(list((tmp_path / "jobs" / "jobs" / "students").glob("*/*_log.err"))) == 5 + 7
    kept = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "jobs" / "reference_rows").glob("*.json"))
    assert kept == sorted(["random", "random-frozen-encoder", "random-split-like-PTM-ST", "herding", "kcenter",
                           "forgetting", "full-training-set"])


def kill_when_cut(runs: Path, pattern: str, killed: dict, deadline: float) -> None:
    """SIGKILL the process distilling the run ``pattern`` once it has saved a resume state mid-run."""
    while time.time() < deadline:
        for folder in runs.glob(pattern):
            run = RunFolder(folder)
            owner = (folder / ".lock").read_text() if (folder / ".lock").is_file() else ""
            if run.latest.is_file() and owner.startswith("pid ") and not run.finished():
                pid = int(owner.split()[1])
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, folder=folder)
                return
        time.sleep(0.01)


@pytest.mark.slow
def test_a_job_killed_mid_run_is_named_and_the_next_call_resumes_it_recomputing_nothing_finished(tmp_path):
    from distill_utils.app import ablation
    argv = ["--workdir", str(tmp_path), *SMOKE, "--methods", "lors", "ptmst", "--ptmst_layout", "even",
            "--iterations", "40", "--eval_it", "4", "--launcher", "submitit_local"]
    runs = tmp_path / "ablation_runs" / "shapes"
    killed: dict = {}
    watcher = threading.Thread(target=kill_when_cut, args=(runs, "ptmst_b4_s0_*", killed, time.time() + 300))
    watcher.start()
    with pytest.raises(UsageError) as error:
        ablation.main(argv)
    watcher.join()
    assert killed, "the ptmst run was never caught mid-run"
    assert "did not finish: run 2/2: ptmst, 4 pairs, seed 0" in str(error.value)
    assert "ptmst" in (tmp_path / "jobs" / launch.FAILED_FILE).read_text()
    cut = RunFolder(killed["folder"])
    assert cut.latest.is_file() and not cut.finished()
    (lors,) = runs.glob("lors_b4_s0_*")
    finished = {p: p.stat().st_mtime_ns for p in lors.rglob("*") if p.is_file()}

    report = ablation.main(argv)
    assert {p: p.stat().st_mtime_ns for p in lors.rglob("*") if p.is_file() and p in finished} == finished
    assert RunFolder(lors).finished() and cut.finished()
    history = [json.loads(line) for line in cut.history.read_text().splitlines()]
    assert len(history) == 2 and history[1].get("resumed_at")  # the rerun continued from the saved state
    assert not (tmp_path / "jobs" / launch.FAILED_FILE).exists()
    assert {key[0] for key in results_cells(report)} >= {"lors", "ptmst", "random"}
    # only the cut run was submitted again: one more distill job, none for the finished lors run
    assert len(list((tmp_path / "jobs" / "distill").glob("*/*_log.err"))) == 3


RACE_RUN = """
import sys
from pathlib import Path
from distill_utils.app import ablation
from distill_utils.pipeline import stages, sweep
from distill_utils.runtime.runs import RunFolder
work = stages.Workdir(Path(sys.argv[1]), ablation.SCRIPTS)
plan = ablation.PRESETS["smoke"]
stages.generate_data(plan.quickstart, work)
model = sweep.model_namespace(plan, work, [])
folders = sweep.Experts(plan, work, model, [], True)()
run, flags = sweep.run_for(plan, work, "lors", 4, 0, folders, work / "ablation_runs", model.dataset, ["--syn_steps", "1"])
sweep.ensure_run(work, run, flags, "the raced run")
print("RUN", run.path, RunFolder(run.path).finished())
"""


@pytest.mark.slow
def test_two_calls_at_once_never_distil_the_same_run_twice(tmp_path):
    """Two sweeps (or a job and its requeued twin) reach the same run: one distils it, the other waits for it
    and reuses it; neither fails."""
    script = tmp_path / "race.py"
    script.write_text(RACE_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "work")], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [r.communicate(timeout=600) for r in racers]
    assert all(r.returncode == 0 for r in racers), [o[1][-2000:] for o in outputs]
    (folder,) = {line.split()[1] for o in outputs for line in o[0].splitlines() if line.startswith("RUN ")}
    assert all(f"RUN {folder} True" in o[0] for o in outputs)
    assert len(RunFolder(Path(folder)).history.read_text().splitlines()) == 1  # distilled once, never resumed
    assert sum("(finished earlier with the same flags: reused)" in o[0] + o[1] for o in outputs) == 1


def study_payload(workdir: Path, *extra: str) -> dict:
    done = subprocess.run(["bash", "sh/study.sh", "scale", "--workdir", str(workdir), "--preset", "smoke", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = [line.split("report: ", 1)[1] for line in done.stdout.splitlines() if line.startswith("report: ")]
    return json.loads((Path(report).parent / "results.json").read_text())


@pytest.mark.slow
def test_the_scale_study_under_submitit_local_gives_the_local_table(tmp_path):
    local = study_payload(tmp_path / "local")
    jobs = study_payload(tmp_path / "jobs", "--launcher", "submitit_local")
    assert jobs["table"] == local["table"] and jobs["per_seed"] == local["per_seed"]
    assert len(list((tmp_path / "jobs" / "jobs" / "students").glob("*/*_log.err"))) >= 2
