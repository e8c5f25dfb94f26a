"""ODE steps as a function of the diffusion timestep (`ode_step_schedule`)."""

import pytest
import torch

from diffusers_cunet import ContinuousUNet2DModel


def tiny_model(**overrides) -> ContinuousUNet2DModel:
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=2,
                  attention_levels=(-1,), attention_head_dim=8, time_embedding_dim=16, ode_solver="rk4")
    config.update(overrides)
    torch.manual_seed(0)
    return ContinuousUNet2DModel(**config).eval()


@pytest.mark.parametrize("timestep, expected_steps", [(0, 1), (499, 1), (500, 3), (999, 3)])
def test_schedule_picks_steps_by_timestep(timestep, expected_steps):
    model = tiny_model(ode_step_schedule=[[500, 3], [0, 1]])
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), timestep)
    blocks = len(model.dynamic_blocks)
    assert model.nfe.total == 4 * expected_steps * blocks


def test_schedule_matches_fixed_steps_output():
    sample = torch.randn(2, 1, 8, 8)
    scheduled = tiny_model(ode_step_schedule=[[0, 1], [500, 3]])
    fixed = tiny_model(ode_steps=3)
    with torch.no_grad():
        torch.testing.assert_close(scheduled(sample, 700).sample, fixed(sample, 700).sample)


def test_schedule_uses_noisiest_sample_of_batch():
    model = tiny_model(ode_step_schedule=[[0, 1], [500, 2]])
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), torch.tensor([100, 900]))
    assert model.nfe.per_block["mid_block"] == 8


def test_schedule_round_trips_through_config(tmp_path):
    model = tiny_model()
    model.set_ode_step_schedule([[0, 1], [600, 2]])
    model.save_pretrained(tmp_path)
    loaded = ContinuousUNet2DModel.from_pretrained(tmp_path)
    assert loaded.config.ode_step_schedule == [[0.0, 1], [600.0, 2]]
    assert loaded.step_schedule == [(0.0, 1), (600.0, 2)]


def test_schedule_switched_off_with_none():
    model = tiny_model(ode_step_schedule=[[0, 2]])
    model.set_ode_step_schedule(None)
    with torch.no_grad():
        model(torch.randn(1, 1, 8, 8), 10)
    assert model.nfe.per_block["mid_block"] == 4


@pytest.mark.parametrize("schedule", [[[0, 0]], [[0]], [["a", 1]], [[0, 1.5]]])
def test_schedule_rejects_bad_entries(schedule):
    with pytest.raises(ValueError, match="ode_step_schedule"):
        tiny_model(ode_step_schedule=schedule)


def test_schedule_rejected_for_adaptive_solver():
    model = tiny_model(ode_solver="dopri5")
    with pytest.raises(ValueError, match="fixed-step solver"):
        model.set_ode_step_schedule([[0, 1]])
