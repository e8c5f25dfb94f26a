"""Render the model card of a trained pipeline with huggingface_hub's `ModelCard`."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

CARD_TAGS = ["diffusers", "unconditional-image-generation", "diffusers-cunet", "neural-ode"]

# Training options shown in the card, in this order, when they are set.
SETTINGS_SHOWN = (
    "model", "preset", "resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "use_ema", "ema_max_decay", "ema_power", "mixed_precision", "prediction_type", "snr_gamma",
    "ddpm_num_steps", "ddpm_beta_schedule", "ode_solver", "ode_steps", "ode_backend", "no_attention",
    "no_residual", "num_class_embeds", "seed",
)

RESULT_LABELS = {
    "parameters": "parameters",
    "nfe_per_denoising_step": "acceleration evaluations (NFE) per denoising step",
    "final_loss": "final training loss",
    "global_step": "optimizer steps",
    "training_seconds": "training time (s)",
    "training_seconds_this_run": "training time of the last resumed run (s)",
    "time_budget": "step count and time budget",
    "images_per_second": "training images per second",
    "sampling_seconds_per_image": "sampling time per image (s)",
    "sampler": "sampler of the grid",
    "digit_confident_share": "share of 64 samples the digit classifier calls with p >= 0.9",
    "digit_num_classes": "digit classes among those samples",
    "hardware": "hardware",
    "num_processes": "processes",
}


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _dataset_id(args: dict) -> str | None:
    if args.get("dataset_name"):
        return args["dataset_name"]
    if not args.get("train_data_dir"):
        return "mnist"
    return None


def render_model_card(
    args: dict,
    results: dict,
    sample_grid: str = "samples/final.png",
    repo_id: str | None = None,
    model_config: dict | None = None,
) -> ModelCard:
    """Build the card of a pipeline trained by `examples/train_cunet.py`.

    Args:
        args: The training options (`vars(args)`).
        results: Measured figures (parameters, NFE, loss, time, hardware, digit verdict).
        sample_grid: Path of the sample grid, relative to the pipeline folder.
        repo_id: Hub repo id used in the loading snippet; the output folder's path when `None`.
        model_config: The trained model's config; the card names its nonlinearity and initial velocity
            (the model's defaults, softplus and the network, when `None`).
    """
    dataset = _dataset_id(args)
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=list(CARD_TAGS),
        datasets=[dataset] if dataset else None,
        pipeline_tag="unconditional-image-generation",
    )
    settings_rows = [
        f"| `{name}` | {_format(args[name])} |" for name in SETTINGS_SHOWN if args.get(name) not in (None, False)
    ]
    result_rows = [
        f"| {label} | {_format(results[key])} |" for key, label in RESULT_LABELS.items() if results.get(key) is not None
    ]
    model_kind = "UNet2DModel baseline" if args.get("model") == "unet" else "continuous U-Net"
    sample_caption = f"Samples from the EMA weights, {results.get('sampler', 'DDIM')}, fixed seed {args.get('seed', 0)}."
    if results.get("digit_confident_share") is not None:
        sample_caption += (
            f" The package's MNIST digit classifier calls {100 * results['digit_confident_share']:.0f}% of 64 samples"
            f" with probability at least 0.9, covering {results['digit_num_classes']} digit classes."
        )
    conditional_note = ""
    if args.get("num_class_embeds") or args.get("class_conditional"):
        conditional_note = (
            "This model is class-conditional: generate with `diffusers_cunet.pipelines.ContinuousUNetPipeline`, "
            "which takes `class_labels=`."
        )
    model_summary, description = _describe_model(args, model_kind, dict(model_config or {}))
    limitations = (
        "Trained briefly on a small dataset, so samples are less varied than the training data. The training "
        "loss, the digit classifier's verdict and the timings above are single measurements on the stated "
        "hardware, not averages."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=f"Continuous U-Net DDPM: {dataset or 'image folder'}",
        dataset=dataset or "an image folder",
        sample_grid=sample_grid,
        sample_caption=sample_caption,
        repo_id=repo_id or "path/to/output_dir",
        conditional_note=conditional_note,
        results_table="\n".join(result_rows),
        settings_table="\n".join(settings_rows),
        model_summary=model_summary,
        model_description=description,
        limitations=limitations,
    )


def _describe_model(args: dict, model_kind: str, model_config: dict) -> tuple[str, str]:
    """Return the card's opening sentence and its model section, following the model and ablation options."""
    if args.get("model") == "unet":
        summary = (
            "A denoising diffusion probabilistic model (DDPM) whose denoiser is diffusers' `UNet2DModel` in the "
            "baseline layout of `diffusers_cunet.presets.thesis_unet`, trained for comparison with the continuous U-Net."
        )
        description = (
            f"{model_kind}: ResNet blocks with a timestep embedding, self-attention at 16x16 and in the mid block. "
            "It has no ODE solver settings."
        )
        return summary, description
    parts = ["a timestep embedding"]
    if not args.get("no_residual"):
        parts.append("a residual path")
    if not args.get("no_attention"):
        parts.append("self-attention at the attention levels")
    features = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    summary = (
        "A denoising diffusion probabilistic model (DDPM) whose denoiser is a **continuous U-Net** "
        "(`diffusers_cunet.ContinuousUNet2DModel`): every block of the U-Net is a second-order neural ODE "
        f"with {features}."
    )
    residual = "" if args.get("no_residual") else ", plus a residual path"
    nonlinearity = model_config.get("nonlinearity", "softplus")
    trained_with = (
        f" It was trained with {model_config['ode_solver']}, {model_config.get('ode_steps', 1)} step(s) per block, "
        "and samples with that setting."
        if model_config.get("ode_solver") else ""
    )
    initial_velocity = {
        "linear": "v(0) = g(h) (a 1x1 conv)",
        "zero": "v(0) = 0",
    }.get(model_config.get("initial_velocity", "network"), "v(0) = g(h) (an initial-velocity network)")
    description = (
        f"{model_kind}: each dynamic block maps a feature map h to x(1), where x(0) = h, {initial_velocity}, "
        "dx/ds = v and dv/ds = a(x, v, emb), solved over s in [0, 1]. The "
        f"acceleration field is GroupNorm, 3x3 convolutions, {nonlinearity} and FiLM from the timestep "
        f"embedding{residual}.{trained_with} `pipe.unet.set_ode_solver(...)` can change the solver, but the "
        "solver is part of what the model learned: with another solver or step count it computes a different "
        "function, and a model trained with one step per block can stop producing recognizable samples."
    )
    return summary, description
