"""Atomic checkpoint folders named `checkpoint-<optimizer step>`, with rotation and `latest` lookup."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders in `output_dir`, oldest step first (half-written ones are skipped)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> Path | None:
    """Return the folder to resume from: a path, or the newest checkpoint for `latest` (None if there is none)."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder; pass a "
            f"checkpoint-N folder or 'latest' (looked in {str(output_dir)!r})."
        )
    return path


def checkpoint_step(path: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not named checkpoint-<step>; rename it or pass the right folder.")
    return int(match.group(1))


def save_checkpoint_atomically(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None) -> Path:
    """Save the accelerator state to `checkpoint-<step>` through a temporary folder and a rename.

    A crash while writing leaves only a `.tmp-` folder, never a half-written checkpoint that
    `latest` would pick. With `total_limit`, older checkpoints are removed after the new one exists.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit is not None:
            checkpoints = list_checkpoints(output_dir)
            for stale in checkpoints[: max(0, len(checkpoints) - total_limit)]:
                logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", stale, total_limit)
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final
