"""Tests that diffusers pipelines save and load a third-party component once its package is registered.

The tests use stand-in packages written under `tmp_path`: a tiny `ModelMixin` defined in a submodule and exported by
the package, like `ContinuousUNet2DModel` in `diffusers_cunet`. `cunet_standin` calls `register_with_diffusers` in its
`__init__.py`, as `diffusers_cunet` does; `cunet_standin_unregistered` does not, and shows what diffusers 0.42 does
without the registration.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from diffusers.pipelines import pipeline_loading_utils

from diffusers_cunet.hub import register_with_diffusers, write_remote_code_loader
from hub_server import hub_client_environment


REGISTERED_PACKAGE = "cunet_standin"
UNREGISTERED_PACKAGE = "cunet_standin_unregistered"
MODEL_CLASS = "TinyUNet2DModel"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

_MODEL_SOURCE = '''\
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput


class TinyUNet2DModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, sample, timestep, return_dict: bool = True):
        output = self.conv(sample)
        return UNet2DOutput(sample=output) if return_dict else (output,)
'''

_REGISTRATION_SOURCE = f"""
from diffusers_cunet.hub import register_with_diffusers

register_with_diffusers(library_name=__name__, class_names=["{MODEL_CLASS}"])
"""


def _write_standin_package(root: Path, name: str, register: bool) -> None:
    package = root / name
    (package / "models").mkdir(parents=True)
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "tiny_unet.py").write_text(_MODEL_SOURCE)
    init_source = f"from .models.tiny_unet import {MODEL_CLASS}\n"
    if register:
        init_source += _REGISTRATION_SOURCE
    (package / "__init__.py").write_text(init_source)


@pytest.fixture
def standin_path(tmp_path, monkeypatch):
    """Write both stand-in packages, make them importable, and undo their imports and registration afterwards."""
    root = tmp_path / "standin_site"
    _write_standin_package(root, REGISTERED_PACKAGE, register=True)
    _write_standin_package(root, UNREGISTERED_PACKAGE, register=False)
    monkeypatch.syspath_prepend(str(root))

    # Registration mutates diffusers' module-level tables, so restore them for the other tests in this process.
    loadable_classes = copy.deepcopy(pipeline_loading_utils.LOADABLE_CLASSES)
    importable_classes = copy.deepcopy(pipeline_loading_utils.ALL_IMPORTABLE_CLASSES)
    yield root
    pipeline_loading_utils.LOADABLE_CLASSES.clear()
    pipeline_loading_utils.LOADABLE_CLASSES.update(loadable_classes)
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.clear()
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(importable_classes)
    for module_name in list(sys.modules):
        if module_name.split(".")[0] in (REGISTERED_PACKAGE, UNREGISTERED_PACKAGE):
            del sys.modules[module_name]


def _import_standin(name: str):
    __import__(name)
    return sys.modules[name]


def _save_pipeline(package_name: str, folder: Path) -> DDPMPipeline:
    model_class = getattr(_import_standin(package_name), MODEL_CLASS)
    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=model_class(), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained(folder)
    return pipeline


def _read_model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def _run_python(script: str, *, extra_path: Path, environment: dict[str, str] | None = None) -> dict:
    """Run `script` in a fresh interpreter and return the JSON object it prints on its last line."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update(environment or {})
    env["PYTHONPATH"] = os.pathsep.join([str(extra_path), str(PROJECT_ROOT)])
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, f"subprocess failed:\n{completed.stdout}\n{completed.stderr}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_register_is_idempotent(standin_path):
    _import_standin(REGISTERED_PACKAGE)
    expected_methods = ["save_pretrained", "from_pretrained"]

    register_with_diffusers(library_name=REGISTERED_PACKAGE, class_names=[MODEL_CLASS])
    register_with_diffusers(library_name=REGISTERED_PACKAGE, class_names=[MODEL_CLASS])

    assert pipeline_loading_utils.LOADABLE_CLASSES[REGISTERED_PACKAGE] == {MODEL_CLASS: expected_methods}
    assert pipeline_loading_utils.ALL_IMPORTABLE_CLASSES[MODEL_CLASS] == expected_methods
    assert pipeline_loading_utils.LOADABLE_CLASSES["diffusers"]["ModelMixin"] == expected_methods


@pytest.mark.parametrize(
    "library_name, class_names, message",
    [
        (f"{REGISTERED_PACKAGE}.models", [MODEL_CLASS], "not a top-level package name"),
        (REGISTERED_PACKAGE, MODEL_CLASS, "is a string"),
        (REGISTERED_PACKAGE, ["MissingModel"], "does not export a class named 'MissingModel'"),
        ("json", ["JSONDecoder"], "has no save_pretrained or from_pretrained"),
    ],
)
def test_register_rejects_invalid_input(standin_path, library_name, class_names, message):
    with pytest.raises(ValueError, match=message):
        register_with_diffusers(library_name=library_name, class_names=class_names)

    assert "json" not in pipeline_loading_utils.LOADABLE_CLASSES
    assert "MissingModel" not in pipeline_loading_utils.ALL_IMPORTABLE_CLASSES


def test_register_rejects_reexported_class(standin_path, monkeypatch):
    standin = _import_standin(REGISTERED_PACKAGE)
    monkeypatch.setattr(standin, "UNet2DModel", DDPMPipeline, raising=False)

    with pytest.raises(ValueError, match="Register it with library_name='diffusers'"):
        register_with_diffusers(library_name=REGISTERED_PACKAGE, class_names=["UNet2DModel"])


def test_register_rejects_conflicting_class_name(standin_path, monkeypatch):
    _import_standin(REGISTERED_PACKAGE)
    monkeypatch.setitem(pipeline_loading_utils.ALL_IMPORTABLE_CLASSES, MODEL_CLASS, ["save", "load"])

    with pytest.raises(ValueError, match="already registered"):
        register_with_diffusers(library_name=REGISTERED_PACKAGE, class_names=[MODEL_CLASS])


def test_model_index_names_package(standin_path, tmp_path):
    folder = tmp_path / "registered"

    _save_pipeline(REGISTERED_PACKAGE, folder)

    assert _read_model_index(folder)["unet"] == [REGISTERED_PACKAGE, MODEL_CLASS]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_model_index_without_registration(standin_path, tmp_path):
    # Without registration diffusers records the defining module path, the problem the registration fixes.
    folder = tmp_path / "unregistered"

    _save_pipeline(UNREGISTERED_PACKAGE, folder)

    assert _read_model_index(folder)["unet"] == [f"{UNREGISTERED_PACKAGE}.models.tiny_unet", MODEL_CLASS]


def test_load_from_hub_by_repo_id(standin_path, tmp_path, hub_server):
    folder = tmp_path / "saved"
    saved = _save_pipeline(REGISTERED_PACKAGE, folder)
    hub_server.seed_repo("test-user/standin-ddpm", folder)

    loaded = DDPMPipeline.from_pretrained("test-user/standin-ddpm")

    model_class = getattr(sys.modules[REGISTERED_PACKAGE], MODEL_CLASS)
    assert type(loaded.unet) is model_class
    for name, tensor in saved.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    assert hub_server.find_requests("GET", "/unet/diffusion_pytorch_model.safetensors")
    images = loaded(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, 8, 8, 1)


def test_load_from_hub_without_registration(standin_path, tmp_path, hub_server):
    # diffusers 0.42 rejects a third-party library on Hub download even when the caller imported it.
    folder = tmp_path / "saved"
    _save_pipeline(UNREGISTERED_PACKAGE, folder)
    model_index = _read_model_index(folder)
    model_index["unet"] = [UNREGISTERED_PACKAGE, MODEL_CLASS]
    (folder / "model_index.json").write_text(json.dumps(model_index))
    hub_server.seed_repo("test-user/unregistered-ddpm", folder)

    with pytest.raises(ValueError, match=f"unet/{UNREGISTERED_PACKAGE}.py as defined in `model_index.json` does not"):
        DDPMPipeline.from_pretrained("test-user/unregistered-ddpm")


def test_load_with_passed_component(standin_path, tmp_path):
    folder = tmp_path / "saved"
    _save_pipeline(REGISTERED_PACKAGE, folder)
    replacement = getattr(sys.modules[REGISTERED_PACKAGE], MODEL_CLASS)(sample_size=8)

    loaded = DDPMPipeline.from_pretrained(folder, unet=replacement)

    assert loaded.unet is replacement


_LOAD_AFTER_IMPORT_SCRIPT = """
import json
import sys

import {package}
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained({source!r})
unet = pipeline.unet
print(json.dumps({{
    "class": type(unet).__module__ + "." + type(unet).__qualname__,
    "weight_sum": float(sum(parameter.detach().sum() for parameter in unet.parameters())),
}}))
"""


@pytest.mark.parametrize("source", ["local_folder", "hub_repo_id"])
def test_load_in_fresh_process(standin_path, tmp_path, hub_server, source):
    folder = tmp_path / "saved"
    saved = _save_pipeline(REGISTERED_PACKAGE, folder)
    hub_server.seed_repo("test-user/standin-ddpm", folder)
    pretrained = str(folder) if source == "local_folder" else "test-user/standin-ddpm"
    environment = hub_client_environment(hub_server.url, tmp_path / "subprocess_hf_home", hub_server.token)

    result = _run_python(
        _LOAD_AFTER_IMPORT_SCRIPT.format(package=REGISTERED_PACKAGE, source=pretrained),
        extra_path=standin_path,
        environment=environment,
    )

    assert result["class"] == f"{REGISTERED_PACKAGE}.models.tiny_unet.{MODEL_CLASS}"
    expected_sum = float(sum(parameter.detach().sum() for parameter in saved.unet.parameters()))
    assert result["weight_sum"] == pytest.approx(expected_sum, abs=1e-6)
    weight_downloads = hub_server.find_requests("GET", "/unet/diffusion_pytorch_model.safetensors")
    assert len(weight_downloads) == (1 if source == "hub_repo_id" else 0)


_TRUST_REMOTE_CODE_SCRIPT = """
import json
import sys

from diffusers import DiffusionPipeline

repo_id = {repo_id!r}
try:
    DiffusionPipeline.from_pretrained(repo_id)
    error_without_trust = None
except ValueError as error:
    error_without_trust = str(error)

pipeline = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
print(json.dumps({{
    "pipeline": type(pipeline).__name__,
    "class": type(pipeline.unet).__module__ + "." + type(pipeline.unet).__qualname__,
    "error_without_trust": error_without_trust,
}}))
"""


def test_trust_remote_code_loader(standin_path, tmp_path, hub_server):
    folder = tmp_path / "saved"
    _save_pipeline(REGISTERED_PACKAGE, folder)
    loader_path = write_remote_code_loader(folder, library_name=REGISTERED_PACKAGE, class_name=MODEL_CLASS)
    hub_server.seed_repo("test-user/remote-code-ddpm", folder)
    environment = hub_client_environment(hub_server.url, tmp_path / "subprocess_hf_home", hub_server.token)

    # The script never imports the stand-in package: only the loader file in the repo does.
    result = _run_python(
        _TRUST_REMOTE_CODE_SCRIPT.format(repo_id="test-user/remote-code-ddpm"),
        extra_path=standin_path,
        environment=environment,
    )

    assert loader_path == folder / "unet" / f"{REGISTERED_PACKAGE}.py"
    assert result["pipeline"] == "DDPMPipeline"
    assert result["class"] == f"{REGISTERED_PACKAGE}.models.tiny_unet.{MODEL_CLASS}"
    assert "trust_remote_code=True" in result["error_without_trust"]
    assert hub_server.find_requests("GET", f"/unet/{REGISTERED_PACKAGE}.py")


def test_remote_code_loader_content(standin_path, tmp_path):
    folder = tmp_path / "saved"
    _save_pipeline(REGISTERED_PACKAGE, folder)

    loader_path = write_remote_code_loader(folder, library_name=REGISTERED_PACKAGE, class_name=MODEL_CLASS)

    assert f"from {REGISTERED_PACKAGE} import {MODEL_CLASS}\n" in loader_path.read_text()
    compile(loader_path.read_text(), str(loader_path), "exec")


def test_remote_code_loader_checks_model_index(standin_path, tmp_path):
    folder = tmp_path / "saved"
    _save_pipeline(REGISTERED_PACKAGE, folder)

    with pytest.raises(ValueError, match="would never run the loader"):
        write_remote_code_loader(folder, library_name="other_package", class_name=MODEL_CLASS)
    with pytest.raises(FileNotFoundError, match="vae"):
        write_remote_code_loader(folder, component="vae", library_name=REGISTERED_PACKAGE, class_name=MODEL_CLASS)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        write_remote_code_loader(tmp_path / "empty", library_name=REGISTERED_PACKAGE, class_name=MODEL_CLASS)


def test_model_card_follows_model_and_ablations():
    from diffusers_cunet.hub import render_model_card

    results = {"parameters": 10, "sampler": "ddpm x 4 steps"}
    baseline = str(render_model_card({"model": "unet", "seed": 0}, results, "samples/final.png"))
    ablated = str(render_model_card({"model": "cunet", "no_attention": True, "no_residual": True}, results, "samples/final.png"))
    full = str(render_model_card({"model": "cunet"}, results, "samples/final.png"))
    silu = str(render_model_card({"model": "cunet"}, results, "samples/final.png", model_config={"nonlinearity": "silu"}))

    assert "`UNet2DModel`" in baseline
    assert "set_ode_solver" not in baseline
    assert "neural ODE" not in baseline
    assert "self-attention" not in ablated
    assert "residual path" not in ablated
    assert "a residual path and self-attention" in full
    assert "3x3 convolutions, softplus and FiLM" in full
    assert "3x3 convolutions, silu and FiLM" in silu
