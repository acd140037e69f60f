"""Where the pipeline's jobs run: one after the other in this process, or as submitit jobs on a Slurm
cluster (or on this machine, each job a process of its own: submitit's local executor).

A job is a picklable callable (``pipeline.sweep``'s ``Experts``, ``Distillation``, ``SetStudents``,
``ReferenceRow``). A stage is a list of jobs that do not depend on each other, submitted as one job array
and waited for before the next stage starts, so the jobs that need the experts start after the experts'
job. What a job makes lives in the workdir (run folders, students' results beside them), and job ids
decide nothing: a rerun asks each job whether its result is on disk already and submits only the ones
that are missing or were cut.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..runtime.atomic import atomic_write_text
from ..runtime.errors import UsageError
from ..runtime.progress import progress

log = logging.getLogger("ptmst.launch")

LAUNCHERS = ("local", "slurm", "submitit_local")
JOBS_FOLDER = "jobs"  # under the workdir: each job's submission, stdout and stderr, in jobs/{stage}/{job id}/
FAILED_FILE = "failed_jobs.md"  # in the jobs folder: what the last call could not finish, rewritten every call


class LocalLauncher:
    """Every job in this process, in order; a job's error stops the call."""
    name = "local"

    def run(self, stage: str, jobs: Sequence[Any], bar: bool = False) -> List[Any]:
        return [job() for job in (progress(jobs, desc=stage, unit="job") if bar else jobs)]


LOCAL = LocalLauncher()


@dataclass(frozen=True)
class ClusterOptions:
    """How each job is submitted: Slurm's partition, GPUs and time limit, how many of an array run at once,
    and any other submitit parameter (``slurm_mem``, ``cpus_per_task``, ...) by name."""
    partition: Optional[str] = None
    gpus: Optional[int] = None
    time_min: int = 24 * 60
    max_parallel: Optional[int] = None
    params: Tuple[Tuple[str, Any], ...] = ()

    def parameters(self, stage: str) -> Dict[str, Any]:
        chosen = {"name": f"ptmst_{stage}", "timeout_min": self.time_min, "gpus_per_node": self.gpus,
                  "slurm_partition": self.partition, "slurm_array_parallelism": self.max_parallel}
        return {**{k: v for k, v in chosen.items() if v is not None}, **dict(self.params)}


@dataclass
class JobFailure:
    stage: str
    label: str
    job_id: str
    stderr: str
    reason: str


def parameter_value(text: str) -> Any:
    """A ``KEY=VALUE`` parameter's value as submitit expects it: an int, a float or a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_parameters(options: ClusterOptions, cluster: str, flag: str = "--slurm_param") -> None:
    """submitit's own check of the parameters, turned into an error that names the flag."""
    import submitit
    executor = submitit.AutoExecutor(folder=os.devnull, cluster="debug")
    try:
        executor.update_parameters(**options.parameters("check"))
    except (ValueError, AssertionError, TypeError, NameError) as error:  # submitit raises each, by the fault
        detail = " ".join(str(error).split())
        raise UsageError(f"{flag}: submitit refuses these parameters for the {cluster} launcher: {detail[:600]}. "
                         f"Give KEY=VALUE pairs submitit knows (for example slurm_mem=32G, cpus_per_task=8, "
                         f"slurm_constraint=a100); see submitit's AutoExecutor.update_parameters.") from None


@dataclass
class SubmititLauncher:
    """Each stage one job array through submitit (``cluster`` "slurm", or "local": every job a process on this
    machine), its logs in ``root/{stage}/{job id}/``. A job that is done already (its result on disk) runs
    here at once instead of being submitted; a failed or pre-empted job is named in ``root/failed_jobs.md``
    and in the error, and the next call submits it again."""
    root: Path
    cluster: str = "slurm"
    options: ClusterOptions = field(default_factory=ClusterOptions)
    poll_s: float = 2.0

    @property
    def name(self) -> str:
        return "slurm" if self.cluster == "slurm" else "submitit_local"

    @property
    def local_parallel(self) -> Optional[int]:
        """How many local jobs run at once (None: no limit, or Slurm's own array limit)."""
        return self.options.max_parallel if self.cluster != "slurm" else None

    def executor(self, stage: str):
        import submitit
        executor = submitit.AutoExecutor(folder=self.root / stage / "%j", cluster=self.cluster)
        executor.update_parameters(**self.options.parameters(stage))
        return executor

    def run(self, stage: str, jobs: Sequence[Any], bar: bool = False) -> List[Any]:
        results: List[Any] = [None] * len(jobs)
        failures: List[JobFailure] = []
        waiting = []
        for k, job in enumerate(jobs):
            if getattr(job, "done", lambda: False)():
                results[k] = job()  # its result is on disk: read it here, nothing to submit
            else:
                waiting.append(k)
        if waiting:
            log.info("%s: submitting %d job%s (%d done earlier) as one %s array; logs in %s", stage, len(waiting),
                     "s" * (len(waiting) != 1), len(jobs) - len(waiting), self.name, self.root / stage)
            for k, value in zip(waiting, self.submit_and_wait(stage, [jobs[k] for k in waiting], failures)):
                results[k] = value
        self.stop_if_failed(failures)
        return results

    def submit_and_wait(self, stage: str, jobs: Sequence[Any], failures: List[JobFailure]) -> List[Any]:
        """Slurm takes the whole array at once; the local executor, which has no array limit, keeps
        ``max_parallel`` jobs running and starts the next as soon as one ends."""
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        slots = self.local_parallel or len(jobs)
        results: List[Any] = [None] * len(jobs)
        queue, running, finished = list(range(len(jobs))), [], 0
        while queue or running:
            free = slots - len(running)
            if queue and free > 0:
                batch, queue = queue[:free], queue[free:]
                running += self.submit(stage, [(k, jobs[k]) for k in batch], beside=len(running))
            running, finished = self.collect(stage, running, results, failures, finished, len(jobs))
            if running and (not queue or len(running) >= slots):
                time.sleep(self.poll_s)
        try:
            (self.root / stage / "%j").rmdir()  # the folder pattern itself, made empty by submitit
        except OSError:
            pass
        return results

    def submit(self, stage: str, batch, beside: int = 0) -> list:
        """``(k, job)`` pairs submitted as one array: ``(k, job, handle, submitted at)`` each. Locally each
        takes its share of the cores among the jobs that will run together (``beside`` already running): a
        stage of one job gets them all."""
        executor = self.executor(stage)
        together = min(self.local_parallel, beside + len(batch)) if self.local_parallel else 0
        with job_environment(cpu_share(together) if together else 0):
            with executor.batch():
                handles = [executor.submit(job) for _, job in batch]
        now = time.perf_counter()
        return [(k, job, handle, now) for (k, job), handle in zip(batch, handles)]

    def collect(self, stage: str, running, results: List[Any], failures: List[JobFailure], finished: int,
                total: int):
        """The jobs of ``running`` that ended: results into ``results``, failures into ``failures``, each
        logged (``finished`` of ``total`` before). Returns the ones still running and the count after."""
        still = []
        for k, job, handle, submitted in running:
            if not handle.done():
                still.append((k, job, handle, submitted))
                continue
            finished += 1
            error = handle.exception()
            if error is None:
                results[k] = handle.result()
                log.info("%s job %d/%d done (%s, job %s, %.0fs)", stage, finished, total, label_of(job),
                         handle.job_id, time.perf_counter() - submitted)
            else:
                failures.append(JobFailure(stage, label_of(job), str(handle.job_id),
                                           str(handle.paths.stderr), last_line(error)))
                log.error("%s job %d/%d FAILED (%s, job %s): %s; its stderr: %s", stage, finished, total,
                          label_of(job), handle.job_id, last_line(error), handle.paths.stderr)
        return still, finished

    def stop_if_failed(self, failures: List[JobFailure]) -> None:
        """Write what failed, then stop the call: the stages after it need every result of this one."""
        path = self.root / FAILED_FILE
        if not failures:
            return
        lines = ["# Jobs that did not finish", "",
                 "Run the same command again: it submits these (a cut distillation resumes from its last checkpoint) "
                 "and reuses everything that finished.", "",
                 "| stage | job | job id | why | stderr |", "|---|---|---|---|---|",
                 *[f"| {f.stage} | {f.label} | {f.job_id} | {f.reason.replace('|', '/')} | `{f.stderr}` |"
                   for f in failures], ""]
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines))
        atomic_write_text(path.with_suffix(".json"), json.dumps([vars(f) for f in failures], indent=1))
        named = "; ".join(f"{f.label} (job {f.job_id}: {f.reason}; stderr {f.stderr})" for f in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise UsageError(f"{len(failures)} job{'s' * (len(failures) != 1)} did not finish: {named}{more}. "
                         f"They are listed in {path}. Everything that finished is kept: run the same command again "
                         f"to submit only these (a cut run resumes from its own checkpoint).")


def label_of(job: Any) -> str:
    return getattr(job, "label", type(job).__name__)


def last_line(error: BaseException) -> str:
    """The last meaningful line of a job's error (submitit's carries the job's traceback)."""
    text = str(error).split("You can check full logs")[0]
    if "with trace:" in text:  # submitit's FailedJobError: the job's own traceback, its last line the error
        text = text.split("with trace:", 1)[1]
        lines = [line.strip() for line in text.splitlines() if line.strip().strip("-")]
        return (lines[-1] if lines else type(error).__name__)[:400]
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("-")]
    return (" ".join(lines) if lines else type(error).__name__)[:400]


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_share(parallel: int) -> int:
    """Threads per job when ``parallel`` jobs share this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // parallel)


class job_environment:
    """The job processes import this code the way this process does (the repository root on
    PYTHONPATH; Slurm and the local executor pass the environment on), and ``threads`` > 0 caps each
    one's threads where the caller has set neither variable: local jobs side by side would otherwise each
    start a thread per core and slow one another down."""

    def __init__(self, threads: int = 0):
        self.threads = threads

    def __enter__(self):
        root = str(Path(__file__).resolve().parents[2])
        names = ("PYTHONPATH", *THREAD_VARIABLES)
        self.before = {name: os.environ.get(name) for name in names}
        parts = [p for p in (self.before["PYTHONPATH"] or "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in parts if p != root]])
        if self.threads and all(self.before[name] is None for name in THREAD_VARIABLES):
            for name in THREAD_VARIABLES:
                os.environ[name] = str(self.threads)
        return self

    def __exit__(self, *exc):
        for name, value in self.before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return False


def launcher_for(name: str, workdir: Path, options: ClusterOptions) -> Any:
    """``local`` (this process), ``slurm`` or ``submitit_local`` (submitit's local executor)."""
    if name == "local":
        return LOCAL
    cluster = "slurm" if name == "slurm" else "local"
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm: sbatch is not on PATH, so no job can be submitted from this machine. "
                         "Run the command on a Slurm login node (the workdir on a filesystem the nodes share), or "
                         "use --launcher submitit_local to run the same jobs as processes here.")
    check_parameters(options, name)
    root = Path(workdir) / JOBS_FOLDER
    for stale in (root / FAILED_FILE, (root / FAILED_FILE).with_suffix(".json")):  # a list of the last call's
        stale.unlink(missing_ok=True)
    return SubmititLauncher(root, cluster, options)
