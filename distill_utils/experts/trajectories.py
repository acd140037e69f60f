"""The one module that reads and writes expert trajectories.

On disk, a folder of experts holds either

* the authors' twin files ``img_replay_buffer_{n}.pt`` / ``txt_replay_buffer_{n}.pt``: each a
  ``torch.save``d list of trajectories (ours hold one), a trajectory a list of snapshots, a snapshot
  a list of CPU tensors in ``parameters()`` order; or
* compact shortcut files ``shortcut_{n}.pt`` (written by convexify.py --compact): both endpoints and
  the per-layer beta table of every trajectory, both sides, with parameter names;

plus, optionally, a sidecar ``meta.json`` (format version, encoders, parameter names and shapes) and,
per expert that buffer.py trained, ``forgetting_{n}.json`` (each training pair's forgetting events,
for the forgetting coreset; written in one group with the expert's twin files).
Image and text files are paired by their index ``n``, never by listing order.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..runtime import claims
from ..runtime.atomic import atomic_save, atomic_write_text, temporaries_of, text_writer, torch_writer, write_all
from ..runtime.errors import UsageError
from .shortcut import shortcut_snapshot

log = logging.getLogger(__name__)

META_NAME = "meta.json"
META_VERSION = 1
COMPACT_FORMAT = "ptm-st-shortcut"
COMPACT_VERSION = 1
SIDES = ("image", "text")
_TWIN = {"image": "img_replay_buffer_{}.pt", "text": "txt_replay_buffer_{}.pt"}
_PATTERNS = {"image": re.compile(r"^img_replay_buffer_(\d+)\.pt$"),
             "text": re.compile(r"^txt_replay_buffer_(\d+)\.pt$"),
             "compact": re.compile(r"^shortcut_(\d+)\.pt$")}

Snapshot = List[torch.Tensor]
Trajectory = List[Snapshot]
ShapeList = List[Tuple[str, Tuple[int, ...]]]


class TrajectoryError(UsageError):
    """A trajectory folder or file is missing, unpaired, corrupt or does not fit the model."""


# ----------------------------------------------------------------------------------------- paths
def expert_folder(buffer_path: str, dataset: str, image_encoder: str, text_encoder: str, loss_type: str,
                  no_aug: bool = False) -> Path:
    """``{buffer_path}/{dataset}/{image}_{text}/{loss}{_NoAug}/normal``, the reference's layout."""
    return Path(buffer_path) / dataset / f"{image_encoder}_{text_encoder}" / (
        loss_type + ("_NoAug" if no_aug else "")) / "normal"


def twin_path(folder: Path, side: str, index: int) -> Path:
    return Path(folder) / _TWIN[side].format(index)


def compact_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shortcut_{index}.pt"


def _indices(folder: Path, kind: str) -> List[int]:
    pattern = _PATTERNS[kind]
    return sorted(int(m.group(1)) for m in (pattern.match(p.name) for p in Path(folder).iterdir()) if m)


def _lone_twins(folder: Path, image: set, text: set) -> List[Path]:
    return [twin_path(folder, "image" if n in image else "text", n) for n in sorted(image ^ text)]


def incomplete_twins(folder: Path) -> List[Path]:
    """Files whose image/text twin is missing: an expert whose writer was killed between its two
    renames, or an interrupted copy. Readers skip them; their index stays taken."""
    return _lone_twins(folder, set(_indices(folder, "image")), set(_indices(folder, "text")))


def twin_indices(folder: Path) -> List[int]:
    """Indices with both an image and a text file. Lone files are named in a warning and skipped
    (never paired with another index's file)."""
    image, text = set(_indices(folder, "image")), set(_indices(folder, "text"))
    lonely = [path for path in _lone_twins(folder, image, text)
              if not claims.claim_path(folder, _index_of(path)).exists()]
    if lonely:
        log.warning("%s: skipping %d incomplete expert(s) whose twin file is missing: %s. A buffer.py killed "
                    "while writing leaves these; the next buffer.py run on this machine removes those of its dead "
                    "processes. Otherwise (an interrupted copy?) copy the missing twin or move them away.",
                    folder, len(lonely), ", ".join(p.name for p in lonely[:5]) + (" ..." if len(lonely) > 5 else ""))
    stale = _unclaimed_temporaries(folder)
    if stale:
        log.warning("%s: %d temporary file(s) of interrupted writes (%.1f MB), e.g. %s; no writer holds their "
                    "index, so they can be deleted (the next buffer.py run into this folder does it).",
                    folder, len(stale), sum(p.stat().st_size for p in stale) / 1e6, stale[0].name)
    return sorted(image & text)


def _index_of(path: Path) -> int:
    return int(re.search(r"_(\d+)\.pt$", Path(path).name).group(1))


# ------------------------------------------------------------------------------------ identity
WHOLE_FILE_LIMIT = 8 << 20  # files up to this size are hashed whole
EDGE_BYTES = 1 << 20


def file_digest(path: Path) -> str:
    """A content fingerprint of one trajectory file that costs a few MiB of reading at most. A file
    torch.save wrote is a zip archive whose central directory, at its end, holds the CRC-32 of every
    stored tensor, so its size, first and last MiB change whenever any tensor does."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_LIMIT:
            digest.update(handle.read())
        else:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def trajectory_file_names(folder: Path) -> List[str]:
    """The trajectory files of a folder (twin and compact), in name order."""
    if not Path(folder).is_dir():
        return []
    return sorted(entry.name for entry in Path(folder).iterdir()
                  if any(pattern.match(entry.name) for pattern in _PATTERNS.values()))


def experts_identity(folders: Sequence[Path]) -> List[dict]:
    """Per folder (one per phase): its path and ``{file name: file_digest}`` of its trajectory files;
    what a run records as the experts it was made from."""
    identity = []
    for folder in folders:
        files = {}
        for name in trajectory_file_names(folder):
            try:
                files[name] = file_digest(Path(folder) / name)
            except FileNotFoundError:  # removed while listing: it is not among the experts now
                continue
        identity.append({"folder": str(Path(folder).resolve()), "files": files})
    return identity


def identity_changes(recorded: Sequence[dict], current: Sequence[dict]) -> List[str]:
    """What differs between two :func:`experts_identity` records, one line per folder that changed
    (files rewritten, gone and new, by name). Folders pair by phase, not by path, so a workdir moved
    as a whole keeps its runs."""
    if len(recorded) != len(current):
        return [f"{len(recorded)} expert folders recorded, {len(current)} now"]
    lines = []
    for then, now in zip(recorded, current):
        old, new = then["files"], now["files"]
        parts = [(label, names) for label, names in (
            ("rewritten", sorted(n for n in old if n in new and old[n] != new[n])),
            ("gone", sorted(n for n in old if n not in new)),
            ("new", sorted(n for n in new if n not in old))) if names]
        if parts:
            lines.append(f"{now['folder']}: " + "; ".join(
                f"{label}: {', '.join(names[:4])}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                for label, names in parts))
    return lines


# ------------------------------------------------------------------------------------ writing
def _taken_indices(folder: Path) -> List[int]:
    return _indices(folder, "image") + _indices(folder, "text") + _indices(folder, "compact")


def _leftovers(folder: Path, index: int) -> List[Path]:
    """What a writer of ``index`` killed part-way leaves: its temporaries, a file without its twin, and
    a forgetting sidecar without both twins."""
    paths = [twin_path(folder, side, index) for side in SIDES]
    sidecar = forgetting_path(folder, index)
    found = [temporary for path in [*paths, sidecar] for temporary in temporaries_of(path)]
    present = [path for path in paths if path.exists()]
    lone_sidecar = [sidecar] if sidecar.exists() and len(present) < 2 else []
    return found + (present if len(present) == 1 else []) + lone_sidecar


def _unclaimed_temporaries(folder: Path) -> List[Path]:
    """Temporaries of twin files whose index nobody claims: every writer holds its claim until its
    temporaries are renamed or deleted, so these belong to no live writer."""
    return [path for path in Path(folder).glob(".*_replay_buffer_*.pt.*.tmp")
            if not claims.claim_path(folder, _index_of(path.name.split(".pt.")[0] + ".pt")).exists()]


def remove_stale_writes(folder: Path) -> List[int]:
    """Remove the claims, temporaries and lone twin files of writers on this host that died, and
    temporaries that no claim covers; return the indices whose claims were stale."""
    cleaned = claims.remove_stale_claims(folder, lambda index: _leftovers(folder, index))
    with claims.folder_lock(folder):
        for path in _unclaimed_temporaries(folder):
            path.unlink(missing_ok=True)
            log.warning("%s: removed %s, left by an interrupted write", folder, path.name)
    return cleaned


def claim_next_index(folder: Path) -> int:
    """Reserve the lowest index that no expert file and no claim uses. Several processes (torchrun
    ranks, machines on a shared disk, reruns) never get the same index, and an index whose files
    exist is never claimed again (see :mod:`distill_utils.runtime.claims`). Stale claims of dead processes on
    this host are cleaned first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(folder)
    return claims.claim_first_free(folder, lambda: _taken_indices(folder))


def release_claim(folder: Path, index: int) -> None:
    claims.release(folder, index)


def write_expert(folder: Path, index: int, image_trajectory: Trajectory, text_trajectory: Trajectory,
                 forgetting: Optional[dict] = None) -> Tuple[Path, Path]:
    """Write one expert as the authors' twin files (each a list holding one trajectory), as a pair:
    both temporaries first, then both renames, so a failure leaves neither file. ``forgetting`` (the
    expert's forgetting-event record) joins the group as ``forgetting_{index}.json``, renamed first, so
    an expert whose twins exist always has its record."""
    if len(image_trajectory) != len(text_trajectory):
        raise ValueError("image and text trajectories must have the same number of snapshots")
    paths = twin_path(folder, "image", index), twin_path(folder, "text", index)
    sidecar = [] if forgetting is None else [(forgetting_path(folder, index), text_writer(json.dumps(forgetting)))]
    write_all([*sidecar, (paths[1], torch_writer([_to_cpu(text_trajectory)])),
               (paths[0], torch_writer([_to_cpu(image_trajectory)]))])
    return paths


def experts_source(folder: Path) -> Path:
    """The folder of the experts that ``folder``'s trajectories come from: ``folder`` itself, or for a
    shortcut folder the one its meta.json names (``normal`` beside it, where convexify.py puts shortcuts,
    for folders written before it was recorded)."""
    folder = Path(folder)
    meta = read_meta(folder) if folder.is_dir() else None
    if not meta or "shortcut" not in meta:
        return folder
    return Path(meta["shortcut"].get("source") or folder.parent / "normal")


def forgetting_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"forgetting_{index}.json"


def read_forgetting(folder: Path, index: int, pairs_digest: str) -> dict:
    """Expert ``index``'s forgetting-event record, checked to belong to the training pairs of
    ``pairs_digest``."""
    path = forgetting_path(folder, index)
    if not path.is_file():
        raise TrajectoryError(
            f"{path} does not exist: the forgetting baseline needs the forgetting events buffer.py records while an "
            f"expert trains, and expert {index} in {folder} was trained before buffer.py recorded them (or by "
            f"other code). Train experts into a new folder with this version of buffer.py (--buffer_path NEW) and "
            f"pass it to eval.py as --expert_dir, or drop forgetting from --baseline.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        events, learned = record["events"], record["learned"]
        recorded_digest = record["pairs_digest"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrajectoryError(f"{path} is damaged ({type(error).__name__}: {error}); delete it and train the expert "
                              f"again, or drop forgetting from --baseline.") from None
    if recorded_digest != pairs_digest or len(events) != len(learned):
        raise TrajectoryError(
            f"{path} counts forgetting events of {len(events)} training pairs of another training set (its pair "
            f"digest differs from this dataset's): the expert was trained on other data or another split. Pass the "
            f"--expert_dir of experts trained on this data, or drop forgetting from --baseline.")
    return record


def _to_cpu(trajectory: Trajectory) -> Trajectory:
    return [[t.detach().cpu().contiguous() for t in snapshot] for snapshot in trajectory]


# ------------------------------------------------------------------------------------ metadata
def parameter_shapes(named: Dict[str, torch.Tensor]) -> ShapeList:
    return [(name, tuple(p.shape)) for name, p in named.items()]


def read_meta(folder: Path) -> Optional[dict]:
    path = Path(folder) / META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TrajectoryError(f"{path} is not valid JSON ({error}); delete it (it is only a check) or restore "
                              f"it.") from None
    if not isinstance(meta, dict):
        raise TrajectoryError(f"{path} holds a JSON {type(meta).__name__}, not the object buffer.py writes; delete "
                              f"it (it is only a check) or restore it.")
    return meta


def write_meta(folder: Path, meta: dict, check_only: bool = False) -> None:
    """Write ``meta.json`` (or with ``check_only`` only check it); refuse to mix experts of a different
    model into an existing folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = read_meta(folder)
    meta = {"format_version": META_VERSION, **meta}
    if existing is not None:
        for side in SIDES:
            key = f"{side}_params"
            if key in existing and _shapes(existing[key]) != _shapes(meta[key]):
                raise TrajectoryError(
                    f"{folder} already holds experts of another model ({existing.get('image_encoder')}/"
                    f"{existing.get('text_encoder')}, {side} side shapes differ from this run's). Use another "
                    f"--buffer_path or the matching encoder flags; mixing them would corrupt the folder.")
    if not check_only:
        atomic_write_text(folder / META_NAME, json.dumps(meta, indent=1, default=str))


def _shapes(entries) -> List[Tuple[str, Tuple[int, ...]]]:
    return [(name, tuple(shape)) for name, shape in entries]


# ------------------------------------------------------------------------------------ reading
# OS errors that are about the disk or permissions, not the file's content (a truncated file that
# cannot be memory-mapped raises EINVAL: that one is reported as a damaged file)
_DISK_ERRORS = {errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT, errno.EISDIR, errno.ENOMEM, errno.EMFILE,
                errno.ENFILE, errno.EROFS, errno.ENOSPC}


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        if isinstance(error, RuntimeError) and ("mmap" in str(error).lower() or "zip" in str(error).lower()):
            try:  # files from old torch versions are not zip archives and cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as legacy_error:
                error = legacy_error
        if isinstance(error, OSError) and error.errno in _DISK_ERRORS:
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from None  # named, for the scripts
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrajectoryError(f"cannot read trajectory file {path} ({type(error).__name__}: {first_line[:200]}); it "
                              f"is corrupt, truncated or not a trajectory file: train or download that expert again, "
                              f"or move it out of the folder.") from None


def _check_trajectories(content, path: Path) -> list:
    """A list of trajectories, each a non-empty list of snapshots, each a list of tensors."""
    ok = isinstance(content, list) and bool(content) and all(
        isinstance(trajectory, list) and trajectory and all(
            isinstance(snapshot, (list, tuple)) and snapshot and all(isinstance(t, torch.Tensor) for t in snapshot)
            for snapshot in trajectory) for trajectory in content)
    if not ok:
        raise TrajectoryError(f"{path} is not a list of trajectories (lists of snapshots, each a list of tensors): "
                              f"it is not a trajectory file written by buffer.py or the authors' code; move it out "
                              f"of the folder.")
    return content


class Expert:
    """One expert trajectory; ``snapshot(side, t)`` returns the list of tensors of snapshot ``t``."""

    def __init__(self, name: str, num_snapshots: int, folder: Optional[Path] = None):
        self.name = name
        self.num_snapshots = num_snapshots
        self.folder = folder
        self._checked = set()

    @property
    def where(self) -> str:
        return f"{self.folder}/{self.name}" if self.folder is not None else self.name

    def snapshot(self, side: str, t: int) -> Snapshot:
        raise NotImplementedError

    def flat(self, side: str, t: int) -> torch.Tensor:
        """Snapshot ``t`` of one side as a single float32 vector (parameters() order); the first read of
        each snapshot checks that it is finite."""
        vector = self._vector(side, t)
        if (side, t) not in self._checked:
            self.check_finite(side, t, vector)
        return vector

    def _vector(self, side: str, t: int) -> torch.Tensor:
        return torch.cat([p.reshape(-1).float() for p in self.snapshot(side, t)])

    def check_finite(self, side: str, t: int, vector: Optional[torch.Tensor] = None) -> None:
        if vector is None:
            vector = self._vector(side, t)
        if not torch.isfinite(vector).all():
            raise TrajectoryError(
                f"{self.where_side(side)}: {side}-side snapshot {t} holds NaN/Inf values: that expert diverged or "
                f"the file is damaged. Move its img/txt_replay_buffer pair out of the folder (or train it again) "
                f"and rerun (a distillation continues with --resume: it goes on with the experts that remain).")
        self._checked.add((side, t))

    def where_side(self, side: str) -> str:
        """The file that holds ``side`` of this expert."""
        return self.where


class TwinExpert(Expert):
    def __init__(self, name: str, image: Trajectory, text: Trajectory, folder: Optional[Path] = None):
        if len(image) != len(text):
            raise TrajectoryError(f"{folder}/{name}: the image trajectory has {len(image)} snapshots but the text "
                                  f"trajectory has {len(text)}: the twins are from different runs; train that "
                                  f"expert again or move its pair away.")
        super().__init__(name, len(image), folder)
        self._sides = {"image": image, "text": text}

    def snapshot(self, side: str, t: int) -> Snapshot:
        return list(self._sides[side][t])

    def where_side(self, side: str) -> str:
        name = self.name.replace("img_replay_buffer_", "txt_replay_buffer_", 1) if side == "text" else self.name
        return f"{self.folder}/{name}" if self.folder is not None else name


class CompactExpert(Expert):
    def __init__(self, name: str, record: dict, folder: Optional[Path] = None):
        self._record = record
        super().__init__(name, int(record["image"]["beta"].shape[0]), folder)

    def snapshot(self, side: str, t: int) -> Snapshot:
        part = self._record[side]
        return shortcut_snapshot(part["first"], part["last"], part["beta"], t)


def load_snapshot(model, expert: "Expert", t: int) -> None:
    """Copy snapshot ``t`` of ``expert`` into ``model``'s side parameters (a dual encoder of its shapes)."""
    with torch.no_grad():
        for side in SIDES:
            for parameter, value in zip(model.side_parameters(side), expert.snapshot(side, t)):
                parameter.copy_(value)


@dataclass
class ExpectedShapes:
    """What the model needs: per side, the (name, shape) list in parameters() order."""
    image: ShapeList
    text: ShapeList

    def side(self, side: str) -> ShapeList:
        return self.image if side == "image" else self.text


def _shape_mismatch(got: List[Tuple[int, ...]], want: ShapeList) -> str:
    if len(got) != len(want):
        return f"{len(got)} tensors where the model has {len(want)}"
    for position, (shape, (name, wanted)) in enumerate(zip(got, want)):
        if shape != tuple(wanted):
            return f"tensor {position} ({name}) has shape {shape} where the model has {tuple(wanted)}"
    return ""


class TrajectoryBuffer:
    """All experts in one folder, read lazily: files are memory-mapped on first use and kept, so
    only the snapshots actually asked for are paged in."""

    def __init__(self, folder: Path, expected: Optional[ExpectedShapes] = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            what = "is a file, not a folder" if self.folder.exists() else "does not exist"
            raise TrajectoryError(f"trajectory folder {self.folder} {what}: train experts with buffer.py "
                                  f"(and convexify.py for shortcuts) or fix --buffer_path.")
        self.meta = read_meta(self.folder)
        self.expected = expected
        compact = _indices(self.folder, "compact")
        twins = twin_indices(self.folder)
        if compact and twins:
            raise TrajectoryError(f"{self.folder} mixes compact shortcut files and img/txt_replay_buffer files; "
                                  f"keep one kind per folder.")
        self.kind = "compact" if compact else "twin"
        self.indices = compact or twins
        if not self.indices:
            raise TrajectoryError(f"{self.folder} holds no expert trajectories (img_replay_buffer_n.pt + "
                                  f"txt_replay_buffer_n.pt, or shortcut_n.pt): run buffer.py / convexify.py "
                                  f"first or fix --buffer_path.")
        if self.meta is not None and expected is not None:
            self._check_meta(expected)
        self._files: Dict[int, List[Expert]] = {}

    def _check_meta(self, expected: ExpectedShapes) -> None:
        for side in SIDES:
            recorded = self.meta.get(f"{side}_params")
            if recorded is not None and [s for _, s in _shapes(recorded)] != [s for _, s in expected.side(side)]:
                raise TrajectoryError(
                    f"trajectories in {self.folder} were written for another model: meta.json records image "
                    f"encoder {self.meta.get('image_encoder')!r}, text encoder {self.meta.get('text_encoder')!r}, "
                    f"image_trainable={self.meta.get('image_trainable')} and {side}-side shapes "
                    f"{[s for _, s in _shapes(recorded)][:3]}..., but this model's are "
                    f"{[s for _, s in expected.side(side)][:3]}.... Pass the same encoder flags as buffer.py used.")

    def set_expected(self, expected: ExpectedShapes) -> None:
        """Check the sidecar metadata and every expert against the model's shapes, now."""
        self.expected = expected
        if self.meta is not None:
            self._check_meta(expected)
        for experts in self._files.values():
            for expert in experts:
                self._check_shapes(expert)
        self.experts()

    def experts_in_file(self, index: int) -> List[Expert]:
        if index not in self._files:
            experts = self._read_compact(index) if self.kind == "compact" else self._read_twin(index)
            for expert in experts:
                self._check_shapes(expert)
            self._files[index] = experts
        return self._files[index]

    def _read_twin(self, index: int) -> List[Expert]:
        paths = {side: twin_path(self.folder, side, index) for side in SIDES}
        image = _check_trajectories(_load(paths["image"]), paths["image"])
        text = _check_trajectories(_load(paths["text"]), paths["text"])
        if len(image) != len(text):
            raise TrajectoryError(f"{paths['image'].name} holds {len(image)} trajectories but "
                                  f"{paths['text'].name} holds {len(text)}: they are not twins.")
        return [TwinExpert(f"{paths['image'].name}[{j}]", img, txt, self.folder) for j, (img, txt) in enumerate(zip(image, text))]

    def _read_compact(self, index: int) -> List[Expert]:
        path = compact_path(self.folder, index)
        content = _load(path)
        if not isinstance(content, dict) or content.get("format") != COMPACT_FORMAT:
            raise TrajectoryError(f"{path} is not a compact shortcut file (format {COMPACT_FORMAT!r}).")
        if content.get("version", 0) > COMPACT_VERSION:
            raise TrajectoryError(f"{path} has format version {content['version']}, newer than this code "
                                  f"understands ({COMPACT_VERSION}); update the project.")
        try:
            return [CompactExpert(f"{path.name}[{j}]", record, self.folder) for j, record in enumerate(content["experts"])]
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise TrajectoryError(f"{path} is damaged (missing {error}); run convexify.py --compact --overwrite "
                                  f"to write it again.") from None

    def _check_shapes(self, expert: Expert) -> None:
        if self.expected is None:
            return
        for side in SIDES:
            got = [tuple(t.shape) for t in expert.snapshot(side, 0)]
            problem = _shape_mismatch(got, self.expected.side(side))
            if problem:
                raise TrajectoryError(
                    f"{self.folder}/{expert.name}: the {side}-side snapshot does not fit the model ({problem}). "
                    f"The experts were trained with other encoder flags (--image_encoder, --text_encoder, "
                    f"--image_trainable, --out_embedding); pass the ones buffer.py used.")

    def check_snapshots(self, needed: int, hint: str) -> None:
        """Every expert has snapshot ``needed`` (the highest a run will use; ``hint`` says which flags ask
        for it), finite on both sides. An expert that diverged stays non-finite from then on, and a
        shortcut through a non-finite snapshot is non-finite inside, so this one snapshot per expert
        names almost every damaged one before the first iteration at a third of the reading; the rest
        are checked when first used (:meth:`Expert.flat`)."""
        for expert in self.experts():
            if expert.num_snapshots <= needed:
                raise TrajectoryError(
                    f"{expert.where} has {expert.num_snapshots} snapshots (0..{expert.num_snapshots - 1}) but "
                    f"{hint} needs snapshot {needed}. Move that shorter expert out of the folder, or lower "
                    f"--max_start_epoch so that every expert has the snapshots it needs.")
            for side in SIDES:
                expert.check_finite(side, needed)

    def experts(self) -> List[Expert]:
        """Every expert, in index order (loads each file's index lazily)."""
        return [expert for index in self.indices for expert in self.experts_in_file(index)]

    def __len__(self) -> int:
        return len(self.indices)


def load_trajectory_file(path: Path) -> List[Trajectory]:
    """A whole twin-format file (for convexify.py): a list of trajectories."""
    return _check_trajectories(_load(Path(path)), Path(path))


def save_twin_files(image: List[Trajectory], text: List[Trajectory], folder: Path, index: int) -> Tuple[Path, Path]:
    """Whole twin-format files (for convexify.py), written as a pair."""
    paths = twin_path(folder, "image", index), twin_path(folder, "text", index)
    write_all([(paths[1], torch_writer([_to_cpu(t) for t in text])),
               (paths[0], torch_writer([_to_cpu(t) for t in image]))])
    return paths


def save_compact(path: Path, start: int, end: int, records: Sequence[dict], dtype: torch.dtype) -> None:
    """records: per trajectory ``{side: {"names", "first", "last", "beta"}}``."""
    payload = {"format": COMPACT_FORMAT, "version": COMPACT_VERSION, "start": start, "end": end,
               "dtype": str(dtype).replace("torch.", ""), "experts": [
                   {side: {"names": list(r[side]["names"]),
                           "first": [t.to(dtype).contiguous() for t in r[side]["first"]],
                           "last": [t.to(dtype).contiguous() for t in r[side]["last"]],
                           "beta": r[side]["beta"].float().contiguous()} for side in SIDES}
                   for r in records]}
    atomic_save(payload, Path(path))
