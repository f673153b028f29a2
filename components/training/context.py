"""What a training loop needs from whoever runs it (Ray Train in production, a plain process in tests)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

TRAIN_STATE_FILE = "train_state.pt"
BEST_MODEL_FILE = "best.pt"
HISTORY_FILE = "history.json"


class WorkerContext(Protocol):
    """One training worker's view of the job."""

    rank: int
    world_size: int
    device: torch.device

    def restored_state(self) -> dict[str, Any] | None:
        """The train state of the last checkpoint when the job resumes, else None."""

    def progress(self, epoch: int, step: int, steps: int, loss: float) -> None:
        """After each training step: `step` of the epoch's `steps` done, running mean `loss` (for a progress bar)."""

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        """Report one epoch; rank 0 passes a function that writes the checkpoint files into a folder."""


def read_train_state(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / TRAIN_STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


@dataclass
class LocalContext:
    """Single-process context: checkpoints go to `folder/epoch_XXX`, the latest is resumed from."""

    folder: Path
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reports: list[dict[str, float]] = field(default_factory=list)
    steps: list[tuple[int, int, int, float]] = field(default_factory=list)  # progress: (epoch, step, steps, loss)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(self.folder.glob("epoch_*")) if self.folder.exists() else []
        return done[-1] if done else None

    def restored_state(self) -> dict[str, Any] | None:
        latest = self.latest_checkpoint()
        return read_train_state(latest) if latest else None

    def progress(self, epoch: int, step: int, steps: int, loss: float) -> None:
        self.steps.append((epoch, step, steps, loss))

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        self.reports.append(dict(metrics))
        if write_checkpoint is None:
            return
        target = self.folder / f"epoch_{int(metrics['epoch']):03d}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_checkpoint(tmp)
        os.replace(tmp, target)


def gather_objects(obj: Any) -> list[Any]:
    """all_gather_object across the process group, or [obj] without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_history(folder: Path, history: list[dict[str, float]]) -> None:
    (Path(folder) / HISTORY_FILE).write_text(json.dumps(history, indent=1))
