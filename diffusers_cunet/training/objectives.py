"""Training targets and loss weights for the three diffusers prediction types."""

from __future__ import annotations

import torch
import torch.nn.functional as F


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def signal_to_noise_ratio(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) for integer timesteps, as float32."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def diffusion_loss(
    model_output: torch.Tensor,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    prediction_type: str,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error against the target of `prediction_type`, computed in float32.

    With `snr_gamma`, each sample's loss is weighted by min(SNR, gamma) / (SNR for epsilon,
    SNR + 1 for v-prediction, 1 for sample prediction): the min-SNR-gamma weighting, which trains
    faster than uniform weighting because it stops the low-noise timesteps from dominating.
    """
    model_output = model_output.float()
    clean_images = clean_images.float()
    noise = noise.float()
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = clean_images
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean_images, noise, timesteps).float()
    else:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}.")

    per_sample = F.mse_loss(model_output, target, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()

    snr = signal_to_noise_ratio(scheduler.alphas_cumprod, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1.0)
    else:
        weights = clipped
    return (per_sample * weights).mean()
