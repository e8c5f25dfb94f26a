"""Checkpoint helpers: atomic folders, `latest` lookup, rotation and the run-settings check on resume."""

from __future__ import annotations

import json
import logging

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from diffusers_cunet.training import (
    check_run_settings,
    list_checkpoints,
    read_run_settings,
    resolve_checkpoint,
    save_checkpoint_atomically,
)


SETTINGS = {
    "must_match": {"model_class": "ContinuousUNet2DModel", "model_config": {"ode_solver": "rk4", "widths": (16, 32)},
                   "prediction_type": "v_prediction"},
    "may_differ": {"seed": 0, "train_batch_size": 64},
}


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    # accelerate keeps one state per process, and later tests may create an Accelerator with other settings.
    AcceleratorState._reset_state(reset_partial_state=True)


def test_checkpoints_atomic_rotated_found(tmp_path, accelerator):
    for step in (2, 4, 6):
        save_checkpoint_atomically(accelerator, tmp_path, step, total_limit=2, run_settings=SETTINGS)
    (tmp_path / ".tmp-checkpoint-8").mkdir()  # what a crash in the middle of a save leaves behind

    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-6"
    assert resolve_checkpoint("latest", tmp_path / "empty") is None
    saved = json.loads((tmp_path / "checkpoint-6" / "run_settings.json").read_text())
    assert saved["must_match"]["model_config"]["widths"] == [16, 32]


def test_same_settings_resume_silently(tmp_path, accelerator):
    path = save_checkpoint_atomically(accelerator, tmp_path, 1, total_limit=None, run_settings=SETTINGS)

    assert check_run_settings(path, SETTINGS) == []
    assert read_run_settings(path)["may_differ"]["seed"] == 0


def test_other_model_or_objective_rejected(tmp_path, accelerator):
    path = save_checkpoint_atomically(accelerator, tmp_path, 3, total_limit=None, run_settings=SETTINGS)
    current = json.loads(json.dumps(SETTINGS))
    current["must_match"]["model_config"]["ode_solver"] = "euler"
    current["must_match"]["prediction_type"] = "epsilon"

    with pytest.raises(ValueError) as error:
        check_run_settings(path, current)

    message = str(error.value)
    assert "model_config.ode_solver: checkpoint 'rk4', this run 'euler'" in message
    assert "prediction_type: checkpoint 'v_prediction', this run 'epsilon'" in message
    assert "another --output_dir" in message


def test_missing_config_key_takes_default(tmp_path, accelerator):
    """A checkpoint of an older version lacks a config option added since; it resumes where the option is the default."""
    path = save_checkpoint_atomically(accelerator, tmp_path, 3, total_limit=None, run_settings=SETTINGS)
    current = json.loads(json.dumps(SETTINGS))
    current["must_match"]["model_config"]["initial_velocity"] = "network"
    defaults = {"initial_velocity": "network", "ode_solver": "euler"}

    assert check_run_settings(path, current, model_config_defaults=defaults) == []
    with pytest.raises(ValueError, match="model_config.initial_velocity: checkpoint None, this run 'network'"):
        check_run_settings(path, current)
    current["must_match"]["model_config"]["initial_velocity"] = "linear"
    with pytest.raises(ValueError, match="model_config.initial_velocity: checkpoint 'network', this run 'linear'"):
        check_run_settings(path, current, model_config_defaults=defaults)


def test_other_seed_or_batch_returns_warnings(tmp_path, accelerator):
    path = save_checkpoint_atomically(accelerator, tmp_path, 3, total_limit=None, run_settings=SETTINGS)
    current = json.loads(json.dumps(SETTINGS))
    current["may_differ"]["train_batch_size"] = 32

    messages = check_run_settings(path, current)

    assert messages == [
        "train_batch_size was 64 in checkpoint-3 and is 32 now, so this run will not equal an uninterrupted one"
    ]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"must_match": 3}'])
def test_corrupt_settings_file_named(tmp_path, accelerator, content):
    path = save_checkpoint_atomically(accelerator, tmp_path, 2, total_limit=None, run_settings=SETTINGS)
    (path / "run_settings.json").write_text(content)

    with pytest.raises(ValueError) as error:
        check_run_settings(path, SETTINGS)

    assert "run_settings.json" in str(error.value)
    assert "delete it" in str(error.value)


def test_checkpoint_without_settings_unchecked(tmp_path, accelerator, caplog):
    path = save_checkpoint_atomically(accelerator, tmp_path, 5, total_limit=None)

    with caplog.at_level(logging.WARNING):
        assert check_run_settings(path, SETTINGS) == []
    assert read_run_settings(path) is None
    assert "cannot be checked" in caplog.text
