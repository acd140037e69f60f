"""The one module that owns a distillation run folder (``LOGGED_DIR/DATASET/NAME/``) and the
fingerprint of the flags that decide a result.

A run folder holds ``args.json`` (the flags it started with), ``args_history.jsonl`` (one line per
start, resumes included), ``latest.pt`` (where to continue), ``metrics.jsonl``, and the checkpoints
``distilled_{phase}_{it}.pt`` with their pictures and decoded captions. :class:`RunFolder` answers
what the distiller, eval.py, the quick start and the ablation ask of one: does it hold a run, has it
finished, with which flags, and do they equal the ones a caller asks for now.

:func:`result_digest` fingerprints the flags that decide what a run (or an expert folder) contains,
leaving out those that only say where files go or how fast the work runs; callers that reuse earlier
work compare digests, so no result made with other flags is ever reused.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .atomic import atomic_write_text
from .errors import UsageError

log = logging.getLogger("ptmst.runs")

# Flags that change where files go, what is printed or how fast the work runs, never what it computes.
NEUTRAL_FLAGS = frozenset({
    "name", "logged_dir", "resume", "device", "num_workers", "disabled_wandb", "wandb_project", "batch_size_test",
    "expert_cache_gb", "git_sha", "frozen_norms"})
# An expert folder's experts are decided by buffer.py's flags less these: where they go, how many, what is logged.
EXPERT_NEUTRAL_FLAGS = NEUTRAL_FLAGS | {"buffer_path", "num_experts", "eval_freq", "skip_save", "cache_images"}

DIGEST_LENGTH = 10  # hex characters in folder names: collisions among a workdir's runs are out of reach


class RunFolderError(UsageError):
    """A run folder's records are missing or damaged."""


def comparable(value):
    """``value`` as JSON gives it back (tuples as lists, paths as strings), for comparing flags."""
    return json.loads(json.dumps(value, default=str))


def result_flags(flags: dict, neutral: Iterable[str] = NEUTRAL_FLAGS) -> dict:
    """The flags of ``flags`` that decide a result, in a JSON-comparable form."""
    neutral = set(neutral)
    return {key: comparable(value) for key, value in sorted(flags.items()) if key not in neutral}


def result_digest(flags: dict, neutral: Iterable[str] = NEUTRAL_FLAGS) -> str:
    """A short hex fingerprint of :func:`result_flags`."""
    text = json.dumps(result_flags(flags, neutral), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_LENGTH]


def differing_flags(before: dict, now: dict, neutral: Iterable[str] = NEUTRAL_FLAGS) -> Dict[str, list]:
    """``{flag: [recorded, requested]}`` for the result-deciding flags that differ."""
    a, b = result_flags(before, neutral), result_flags(now, neutral)
    return {key: [a.get(key), b.get(key)] for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def describe_differences(differences: Dict[str, list], limit: int = 4) -> str:
    shown = [f"--{key} {old} -> {new}" for key, (old, new) in list(differences.items())[:limit]]
    more = len(differences) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


class RunFolder:
    """Paths and records of one distillation run folder."""

    ARGS = "args.json"
    HISTORY = "args_history.jsonl"
    LATEST = "latest.pt"
    METRICS = "metrics.jsonl"
    EXPERTS = "experts.json"  # the trajectory files each phase's folder held when the run started

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def args_json(self) -> Path:
        return self.path / self.ARGS

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def latest(self) -> Path:
        return self.path / self.LATEST

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    def checkpoint(self, phase: int, iteration: int) -> Path:
        return self.path / f"distilled_{phase}_{iteration}.pt"

    def checkpoints(self, phase: Optional[int] = None) -> List[Path]:
        """Saved checkpoints (of one phase, or all), in (phase, iteration) order."""
        pattern = f"distilled_{phase}_*.pt" if phase is not None else "distilled_*_*.pt"
        found = []
        for path in self.path.glob(pattern):
            parts = path.stem.split("_")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                found.append(((int(parts[1]), int(parts[2])), path))
        return [path for _, path in sorted(found)]

    # ----------------------------------------------------------------------------- state
    def started(self) -> bool:
        """A resume state exists: the run reached its first checkpoint."""
        return self.latest.is_file()

    def holds_run(self) -> bool:
        """Anything a run wrote is there: its flags, a resume state or a checkpoint."""
        return self.args_json.is_file() or self.history.is_file() or self.started() or bool(self.checkpoints())

    def final_checkpoints(self, recorded: Optional[dict] = None) -> List[Path]:
        """The last checkpoint of every phase: ``distilled_{k}_{Iteration[k]}.pt``."""
        recorded = self.recorded_args() if recorded is None else recorded
        return [self.checkpoint(k, n) for k, n in enumerate(recorded["Iteration"])]

    def finished(self) -> bool:
        try:
            return all(path.is_file() for path in self.final_checkpoints())
        except RunFolderError:
            return False

    # ----------------------------------------------------------------------------- flags
    def history_entries(self) -> List[dict]:
        """Every start's entry; a damaged line (a file cut by an old, non-atomic append) is skipped
        with a warning, so the entries around it still count."""
        if not self.history.is_file():
            return []
        entries, damaged = [], 0
        for line in self.history.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                damaged += 1
                continue
            if isinstance(entry, dict) and isinstance(entry.get("args"), dict):
                entries.append(entry)
            else:
                damaged += 1
        if damaged:
            log.warning("%s: skipped %d damaged line(s); the run's flags come from the others", self.history, damaged)
        return entries

    def recorded_args(self) -> dict:
        """The flags of the run's latest start (a resume may have changed --Iteration), else args.json."""
        entries = self.history_entries()
        if entries:
            return entries[-1]["args"]
        try:
            recorded = json.loads(self.args_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFolderError(f"{self.path} has no {self.ARGS}: it is not a folder distill_ptm-st.py wrote "
                                 f"(LOGGED_DIR/DATASET/RUN), or the run never got past its start-up") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{self.args_json} is damaged ({error}): restore it, or evaluate the run's "
                                 f"checkpoints with eval.py --ckpt_path") from None
        if not isinstance(recorded, dict) or "Iteration" not in recorded:
            raise RunFolderError(f"{self.args_json} does not hold a run's flags: restore it, or evaluate the run's "
                                 f"checkpoints with eval.py --ckpt_path")
        return recorded

    def recorded_digest(self) -> Optional[str]:
        try:
            return result_digest(self.recorded_args())
        except RunFolderError:
            return None

    def record_start(self, flags: dict, resumed_at: Optional[dict], changes: dict, git_sha: str) -> None:
        """``args.json`` keeps the flags of the first start; every start appends a line to
        ``args_history.jsonl``. Both are written atomically (the history as a whole file), so a kill
        never leaves a half line that would merge with the next entry."""
        resolved = {**flags, "git_sha": git_sha}
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.args_json.is_file():
            atomic_write_text(self.args_json, json.dumps(resolved, indent=1, default=str))
        entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "git_sha": git_sha,
                 "resumed_at": resumed_at, "changed": changes, "args": resolved}
        lines = [json.dumps(e, default=str) for e in self.history_entries()] + [json.dumps(entry, default=str)]
        atomic_write_text(self.history, "\n".join(lines) + "\n")

    @property
    def experts_record(self) -> Path:
        return self.path / self.EXPERTS

    def record_experts(self, identity: List[dict]) -> None:
        atomic_write_text(self.experts_record, json.dumps({"format": 1, "phases": identity}, indent=1))

    def recorded_experts(self) -> Optional[List[dict]]:
        """The experts the run was made from, or None for a run that recorded none (older runs)."""
        try:
            record = json.loads(self.experts_record.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{self.experts_record} is damaged ({error}): it records which experts the run was "
                                 f"made from. Move the run folder {self.path} away and run the command again to "
                                 f"distil it afresh") from None
        if not isinstance(record, dict) or not isinstance(record.get("phases"), list):
            raise RunFolderError(f"{self.experts_record} is not a record this project wrote: move the run folder "
                                 f"{self.path} away and run the command again to distil it afresh")
        return record["phases"]

    # ----------------------------------------------------------------------------- metrics
    def trim_metrics(self, phase: int, iteration: int) -> int:
        """Drop the metrics lines logged after (``phase``, ``iteration``), the point a resume continues
        from, so the file reads as one uninterrupted run; return how many were dropped."""
        if not self.metrics.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                after = (record["phase"], record["iteration"]) > (phase, iteration)
            except (json.JSONDecodeError, KeyError, TypeError):
                after = not line.strip() or not line.rstrip().endswith("}")  # a cut last line goes too
            if after:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write_text(self.metrics, "".join(f"{line}\n" for line in kept))
        return dropped


def find_matching_run(parent: Path, base: str, flags: dict) -> RunFolder:
    """The run folder for ``flags`` under ``parent``: ``{base}_{digest}`` where the digest
    fingerprints the result-deciding flags, so a run made with other flags is never reused or resumed
    by mistake; a folder of that name whose recorded flags differ anyway is refused."""
    folder = RunFolder(Path(parent) / f"{base}_{result_digest(flags)}")
    if not folder.holds_run():
        siblings = sorted(Path(parent).glob(f"{base}_*")) if Path(parent).is_dir() else []
        explain_new_folder(folder.path, siblings, lambda path: RunFolder(path).recorded_args(), flags, "run")
    else:
        try:
            recorded = folder.recorded_args()
        except RunFolderError:
            return folder  # no flags recorded yet: a start-up that died early; the distiller decides
        differences = differing_flags(recorded, flags)
        if differences:
            raise RunFolderError(f"{folder.path} was made with other flags ({describe_differences(differences)}) "
                                 f"although its name carries their fingerprint: it was renamed or edited by hand. "
                                 f"Move it away and run the same command again.")
    return folder


def explain_new_folder(chosen: Path, siblings: Sequence[Path], recorded_of, requested: dict, what: str,
                       neutral: Iterable[str] = NEUTRAL_FLAGS) -> None:
    """Log why ``chosen`` is new although ``siblings`` (the same work made with other flags) exist: the
    flags in which the nearest of them differs."""
    others = []
    for sibling in siblings:
        if sibling == chosen:
            continue
        try:
            recorded = recorded_of(sibling)
        except (RunFolderError, OSError, ValueError):
            continue
        if recorded is not None:
            others.append((len(differing_flags(recorded, requested, neutral)), sibling, recorded))
    if others:
        _, nearest, recorded = min(others, key=lambda item: item[0])
        log.info("%s %s is made anew: %d earlier one(s) were made with other flags, and are not reused (the "
                 "nearest, %s, differs in %s)", what, chosen, len(others), nearest.name,
                 describe_differences(differing_flags(recorded, requested, neutral)))


def keyed_folder(parent: Path, flags: dict, neutral: Sequence[str] = NEUTRAL_FLAGS, create: bool = False) -> Path:
    """``parent/{digest}`` for work (experts, a pretrained encoder) decided by ``flags``, with the flags
    beside it in ``flags.json`` for the reader (written by the caller that makes the work, ``create``);
    made once, then reused only by callers with equal flags."""
    chosen = result_flags(flags, neutral)
    folder = Path(parent) / result_digest(chosen, ())
    record = folder / "flags.json"
    if record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            recorded = None
        if recorded is not None and recorded != chosen:
            raise RunFolderError(f"{record} records other flags than its folder name's fingerprint: it was edited "
                                 f"by hand. Move {folder} away and run the same command again.")
    elif create:
        siblings = sorted(p.parent for p in Path(parent).glob("*/flags.json"))
        explain_new_folder(folder, siblings, lambda path: json.loads((path / "flags.json").read_text()), chosen,
                           "folder", ())
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(chosen, indent=1, sort_keys=True))
    return folder
