"""Run bookkeeping: logging set-up, resolved arguments, git SHA, metrics.jsonl and optional wandb."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from .errors import UsageError

log = logging.getLogger("ptmst")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                            stream=sys.stdout)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: the global generators (the CPU's and ``device``'s own on a GPU) start from ``seed``, so
    what is drawn there (weights, dropout masks) does not depend on what the process drew before;
    outside, the caller's streams continue as if nothing had been drawn."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def resolve_device(name: Optional[str]) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r} is not a device: pass cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; pass --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pass one of those")
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


class MetricsLogger:
    """Appends one JSON line per call to ``metrics.jsonl``; mirrors to wandb when enabled."""

    def __init__(self, path: Path, wandb_enabled: bool = False, project: str = "PTM-ST",
                 name: Optional[str] = None, config: Optional[dict] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = self._start_wandb(project, name, config) if wandb_enabled else None

    @staticmethod
    def _start_wandb(project, name, config):
        if os.environ.get("WANDB_MODE", "").lower() == "disabled":
            return None
        try:
            import wandb
            return wandb.init(project=project, name=name, config=config, reinit=True)
        except Exception as error:  # no login, no network: never block the run
            log.warning("wandb unavailable (%s: %s); metrics go to %s only", type(error).__name__, error, "metrics.jsonl")
            return None

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record, default=float) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def format_recall(result: dict) -> str:
    return ("Img R@1={img_r1:.2f} R@5={img_r5:.2f} R@10={img_r10:.2f} | Txt R@1={txt_r1:.2f} R@5={txt_r5:.2f} "
            "R@10={txt_r10:.2f} | R@Mean={r_mean:.2f}").format(**result)
