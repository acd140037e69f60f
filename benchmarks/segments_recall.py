"""Does matching several segments per iteration help? Mean recall of K = 1, 2, 4 on the built-in data.

    bash sh/quickstart.sh --workdir WORK                 # data, encoder, experts and a K=1 run
    python -m benchmarks.segments_recall --workdir WORK  # seeds 0 1 2, K = 1 2 4

Each run is the quick start's distillation (its flags, read from its run folder's args.json) with
``--segments_per_iter K`` and ``--seed S``, evaluated once at the end of each phase: at equal
iterations (the quick start's), and at equal matching work (K segments per iteration for 1/K of the
iterations). Runs already finished in WORK/segments_recall are reused (they are resumed, which
does nothing for a finished run) when the same code version made them; a run made by another
version stops the study with a message instead of lending it its figures. Prints a Markdown table; writes benchmarks/results/segments_recall.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from distill_utils.runtime.runlog import git_sha

from .common import write_json

ROOT = Path(__file__).resolve().parents[1]
# flags of the quick start's run that this study sets itself, or that only name the run
OWN = {"name", "resume", "git_sha", "logged_dir", "eval_it", "eval_init", "segments_per_iter", "seed", "Iteration"}


def quickstart_args(workdir: Path) -> dict:
    runs = sorted((workdir / "logged_files" / "shapes").glob("quickstart_*_seed0/args.json"))
    if not runs:
        raise SystemExit(f"error: no quick start run in {workdir}/logged_files/shapes: run bash sh/quickstart.sh "
                         f"--workdir {workdir} first")
    return json.loads(runs[-1].read_text())


def as_flags(args: dict) -> List[str]:
    flags = []
    for key, value in args.items():
        if key in OWN or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *("true" if v is True else "false" if v is False else str(v) for v in values)]
    return flags


def final_recall(run: Path) -> float:
    """The mean recall of the last evaluation (the last phase's end: every subset trained)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "r_mean" in r][-1]["r_mean"]


def made_by_other_code(run: Path) -> Optional[str]:
    """The code version a run already in ``run`` was made by, where it is not this checkout's."""
    recorded = run / "args.json"
    if not recorded.is_file():
        return None
    made_by = json.loads(recorded.read_text()).get("git_sha")
    return made_by if made_by != git_sha() else None


def distil(base: dict, out: Path, count: int, seed: int, iterations: List[int]) -> dict:
    name = f"k{count}_it{iterations[0]}_seed{seed}"
    run = out / "shapes" / name
    other = made_by_other_code(run)
    if other is not None:
        raise SystemExit(f"error: {run} was made by the code at {other}, this checkout is at {git_sha()}; its "
                         f"recall would be reused as if this code had made it. Delete {out} (or pass a fresh "
                         f"--workdir) and run again.")
    flags = as_flags(base) + ["--segments_per_iter", str(count), "--seed", str(seed), "--Iteration",
                              *map(str, iterations), "--eval_it", str(max(iterations)), "--eval_init", "false",
                              "--logged_dir", str(out), "--name", name, "--resume"]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "distill_ptm-st.py"), *flags], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the run {name} failed:\n{done.stderr[-3000:]}")
    return {"segments": count, "seed": seed, "iterations": iterations, "r_mean": final_recall(run),
            "seconds": time.perf_counter() - began}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="the quick start's --workdir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    base = quickstart_args(args.workdir)
    out = args.workdir / "segments_recall"
    iterations = base["Iteration"]
    runs = []
    for count in args.counts:
        budgets = [iterations] + ([[max(1, it // count) for it in iterations]] if count > 1 else [])
        for budget in budgets:
            for seed in args.seeds:
                runs.append(distil(base, out, count, seed, budget))
                print(json.dumps(runs[-1]), flush=True)
    print("\n| segments per iteration | iterations per phase | mean recall (seeds) | mean ± std | s per run |")
    print("|---|---|---|---|---|")
    for count in args.counts:
        for budget in sorted({tuple(r["iterations"]) for r in runs if r["segments"] == count}, reverse=True):
            group = [r for r in runs if r["segments"] == count and tuple(r["iterations"]) == budget]
            recalls = [r["r_mean"] for r in group]
            spread = statistics.stdev(recalls) if len(recalls) > 1 else 0.0
            print(f"| {count} | {' + '.join(map(str, budget))} | {', '.join(f'{v:.2f}' for v in recalls)} | "
                  f"{statistics.mean(recalls):.2f} ± {spread:.2f} | "
                  f"{statistics.mean(r['seconds'] for r in group):.0f} |")
    payload = {"quickstart_args": base, "runs": runs}
    print(f"\n{write_json('segments_recall', payload)}")
    return payload


if __name__ == "__main__":
    main()
