"""Atomic checkpoint folders named `checkpoint-<optimizer step>`, with rotation and `latest` lookup."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
RUN_SETTINGS_NAME = "run_settings.json"


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


def save_checkpoint_atomically(
    accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None, run_settings: dict | None = None
) -> Path:
    """Save the accelerator state to `checkpoint-<step>` through a temporary folder and a rename.

    A crash while writing leaves only a `.tmp-` folder, never a half-written checkpoint that
    `latest` would pick. With `total_limit`, older checkpoints are removed after the new one exists.
    `run_settings` (see `check_run_settings`) is written next to the state as `run_settings.json`.
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
        if run_settings is not None:
            (temporary / RUN_SETTINGS_NAME).write_text(json.dumps(_as_json(run_settings), indent=2, sort_keys=True) + "\n")
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


def _as_json(value):
    """Round-trip a value through JSON (tuples become lists), so saved and current settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def read_run_settings(checkpoint: str | os.PathLike) -> dict | None:
    """Return the run settings saved with a checkpoint, or None for a checkpoint written without them."""
    path = Path(checkpoint) / RUN_SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        settings, reason = None, f"is not valid JSON ({error})"
    else:
        reason = "is not a JSON object with 'must_match' and 'may_differ' objects"
    well_formed = isinstance(settings, dict)
    if well_formed:
        well_formed = all(isinstance(settings.get(key, {}), dict) for key in ("must_match", "may_differ"))
    if not well_formed:
        raise ValueError(
            f"{str(path)!r} {reason}. Restore it from a copy, or delete it to resume without the settings check."
        )
    return settings


def check_run_settings(
    checkpoint: str | os.PathLike, current: dict, model_config_defaults: dict | None = None
) -> list[str]:
    """Compare a checkpoint's run settings with this run's before resuming from it.

    `current` has two parts. `"must_match"` lists what defines the trained function (the model class and
    config, the noise schedule, the prediction type). A different value there raises a ValueError that
    names each setting, both values and the fix. `"may_differ"` lists what changes only the path of the
    run (seed, batch size, processes, loss weighting). Differences there come back as messages for the
    caller to log, since the resumed run then no longer equals an uninterrupted one.

    `model_config_defaults` fills the config keys that a checkpoint of an older version lacks (an option
    added since), so that they compare as the default that the checkpoint's model was built with.
    """
    saved = read_run_settings(checkpoint)
    if saved is None:
        logger.warning("%s has no %s (written by an older version); the run settings cannot be checked.",
                       checkpoint, RUN_SETTINGS_NAME)
        return []
    saved_config = saved.get("must_match", {}).get("model_config")
    if model_config_defaults and isinstance(saved_config, dict):
        for key, value in _as_json(model_config_defaults).items():
            saved_config.setdefault(key, value)
    current = _as_json(current)
    conflicts = _differences(saved.get("must_match", {}), current.get("must_match", {}))
    if conflicts:
        lines = "\n".join(f"  {name}: checkpoint {old!r}, this run {new!r}" for name, old, new in conflicts)
        remedy = ("Resume with the checkpoint's settings (the same command line it was started with), or start a new run "
                  "in another --output_dir.")
        if any(name.startswith("model_config.") for name, _, _ in conflicts):
            # A preset can change between versions, so the same command line may build another model.
            remedy += f" To build the checkpoint's own model, add --model_config_name_or_path {str(checkpoint)!r}."
        raise ValueError(
            f"{str(checkpoint)!r} was trained with other settings than this run asks for:\n{lines}\n{remedy}"
        )
    return [
        f"{name} was {old!r} in {Path(checkpoint).name} and is {new!r} now, so this run will not equal an "
        "uninterrupted one"
        for name, old, new in _differences(saved.get("may_differ", {}), current.get("may_differ", {}))
    ]


def _differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    found = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found.extend(_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            found.append((f"{prefix}{key}", old, new))
    return found
