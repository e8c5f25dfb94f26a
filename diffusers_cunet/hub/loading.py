# Copyright 2026 The diffusers-cunet developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Register diffusers-cunet with the diffusers pipeline loader.

A saved pipeline's `model_index.json` names each component as `[library, class name]`. diffusers 0.42 loads a
component from a third-party library only in narrow cases, and three code paths in
`diffusers/pipelines/pipeline_loading_utils.py` decide them:

- `_get_custom_components_and_folders`, called by `DiffusionPipeline.download` for a Hub repo id, raises unless the
  library is a key of `LOADABLE_CLASSES`, a module of `diffusers.pipelines`, or the repo contains
  `<component>/<library>.py`.
- `_get_library_or_raise` imports only the libraries in `LOADABLE_CLASSES` and otherwise looks the name up in
  `sys.modules`, so a local folder loads only if the caller imported the library first.
- `_fetch_class_library_tuple`, which `register_modules` uses to fill `model_index.json`, records the top-level
  package only for libraries in `LOADABLE_CLASSES`, and the full module path (such as
  `diffusers_cunet.models.unet_continuous`) for any other class.

[`register_with_diffusers`] adds the package to `LOADABLE_CLASSES`, and its component classes to
`ALL_IMPORTABLE_CLASSES`, which maps each class name to its save and load method names. Once `import diffusers_cunet`
has run, all three paths accept the package name. diffusers still never imports a library just because a repo names
it, so loading needs that import (or the remote-code loader that [`write_remote_code_loader`] writes).
"""

import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from diffusers.pipelines.pipeline_loading_utils import ALL_IMPORTABLE_CLASSES, LOADABLE_CLASSES


logger = logging.getLogger(__name__)

LIBRARY_NAME = "diffusers_cunet"
COMPONENT_CLASS_NAMES = ("ContinuousUNet2DModel",)

# The method names diffusers calls to save and to load a component, in that order.
_SAVE_AND_LOAD_METHODS = ["save_pretrained", "from_pretrained"]


def register_with_diffusers(
    library_name: str = LIBRARY_NAME, class_names: Sequence[str] = COMPONENT_CLASS_NAMES
) -> None:
    r"""
    Register a package's component classes with diffusers' pipeline loader.

    After this call, diffusers (0.42) writes `[library_name, class_name]` into `model_index.json` when it saves a
    pipeline that contains one of these classes. `DiffusionPipeline.from_pretrained` then loads such a component from
    a local folder or a Hub repo id without custom code in the repo. Each class becomes its own entry in
    `LOADABLE_CLASSES[library_name]`, because diffusers looks the entry names up as attributes of the library's
    top-level module to find the load method. Calling it again with the same arguments changes nothing.

    Args:
        library_name (`str`, defaults to `"diffusers_cunet"`):
            Top-level package that defines the classes and exports them from its `__init__.py`. It is imported if it
            is not imported yet.
        class_names (`Sequence[str]`, defaults to `("ContinuousUNet2DModel",)`):
            Names of the component classes, as exported by `library_name`. Each class must define `save_pretrained`
            and `from_pretrained`, as subclasses of diffusers' `ModelMixin` and `ConfigMixin` do.

    Raises:
        `ValueError`:
            If `library_name` is not a top-level package name, a class is not exported by it, is defined in another
            package, or lacks `save_pretrained`/`from_pretrained`, or a class name is already registered by another
            library with different methods.

    Example:

    ```py
    >>> import diffusers_cunet  # calls register_with_diffusers() on import
    >>> from diffusers import DDPMPipeline

    >>> pipe = DDPMPipeline.from_pretrained("user/cunet-mnist")
    ```
    """
    if not library_name or "." in library_name:
        raise ValueError(
            f"library_name={library_name!r} is not a top-level package name. diffusers records a component under the"
            " first part of its module path, so pass the top-level package, for example 'diffusers_cunet'."
        )
    if isinstance(class_names, str):
        raise ValueError(
            f"class_names={class_names!r} is a string. Pass a sequence of names, such as [{class_names!r}]."
        )

    library = importlib.import_module(library_name)
    for class_name in class_names:
        _validate_component_class(library, library_name, class_name)

    for class_name in class_names:
        registered_methods = ALL_IMPORTABLE_CLASSES.get(class_name)
        if registered_methods is not None and list(registered_methods) != _SAVE_AND_LOAD_METHODS:
            raise ValueError(
                f"The class name {class_name!r} is already registered with diffusers with the methods"
                f" {registered_methods}, not {_SAVE_AND_LOAD_METHODS}. diffusers keys these methods by class name"
                " alone, so rename the class to register it."
            )

    library_entry = LOADABLE_CLASSES.setdefault(library_name, {})
    for class_name in class_names:
        library_entry[class_name] = list(_SAVE_AND_LOAD_METHODS)
        ALL_IMPORTABLE_CLASSES[class_name] = list(_SAVE_AND_LOAD_METHODS)
    logger.debug("Registered %s from %s with the diffusers pipeline loader.", list(class_names), library_name)


def _validate_component_class(library, library_name: str, class_name: str) -> None:
    component_class = getattr(library, class_name, None)
    if not isinstance(component_class, type):
        raise ValueError(
            f"{library_name} does not export a class named {class_name!r}. diffusers loads a component with"
            f" getattr({library_name}, {class_name!r}), so import the class in {library_name}/__init__.py before"
            " calling register_with_diffusers."
        )

    defining_package = component_class.__module__.split(".")[0]
    if defining_package != library_name:
        raise ValueError(
            f"{class_name} is defined in {component_class.__module__}, outside {library_name}, so diffusers would"
            f" record it under {defining_package!r} when saving. Register it with library_name={defining_package!r}."
        )

    missing_methods = [name for name in _SAVE_AND_LOAD_METHODS if not callable(getattr(component_class, name, None))]
    if missing_methods:
        raise ValueError(
            f"{library_name}.{class_name} has no {' or '.join(missing_methods)}, which diffusers calls to save and"
            " load a pipeline component. Subclass diffusers' ModelMixin and ConfigMixin, or define both methods."
        )


def write_remote_code_loader(
    folder: str | Path,
    component: str = "unet",
    library_name: str = LIBRARY_NAME,
    class_name: str = COMPONENT_CLASS_NAMES[0],
) -> Path:
    r"""
    Write `<folder>/<component>/<library_name>.py`, the file diffusers runs for `trust_remote_code=True`.

    With this file in a saved pipeline (or its Hub repo), `DiffusionPipeline.from_pretrained(repo,
    trust_remote_code=True)` loads the component even in a process that never imported `library_name`. The file
    only re-exports the class, so the package must still be installed.

    <Tip warning={true}>

    diffusers 0.42 prefers this file to the registered library whenever it exists: once a repo carries it, every
    user must pass `trust_remote_code=True`, including users who imported `diffusers_cunet`.

    </Tip>

    Args:
        folder (`str` or `Path`):
            A folder written by `DiffusionPipeline.save_pretrained`.
        component (`str`, defaults to `"unet"`):
            The pipeline component, which is also the name of its subfolder.
        library_name (`str`, defaults to `"diffusers_cunet"`):
            The library that `model_index.json` names for the component; it is also the loader's file name.
        class_name (`str`, defaults to `"ContinuousUNet2DModel"`):
            The component class that `model_index.json` names.

    Returns:
        `Path`: The path of the loader file.

    Raises:
        `FileNotFoundError`: If `folder` has no `model_index.json` or no `component` subfolder.
        `ValueError`: If `model_index.json` does not name `[library_name, class_name]` for `component`.
    """
    folder = Path(folder)
    model_index_path = folder / "model_index.json"
    component_folder = folder / component
    if not model_index_path.is_file():
        raise FileNotFoundError(
            f"{model_index_path} not found. Pass a folder written by DiffusionPipeline.save_pretrained."
        )
    if not component_folder.is_dir():
        raise FileNotFoundError(
            f"{component_folder} not found. Pass the name of a saved pipeline component, such as 'unet'."
        )

    # diffusers runs `<component>/<library>.py` only when model_index.json names that library and class.
    recorded = json.loads(model_index_path.read_text(encoding="utf-8")).get(component)
    if recorded != [library_name, class_name]:
        raise ValueError(
            f"model_index.json names {component}={recorded!r}, not [{library_name!r}, {class_name!r}], so diffusers"
            f" would never run the loader. Save the pipeline after importing {library_name}, or pass the recorded"
            " library and class."
        )

    loader_path = component_folder / f"{library_name}.py"
    loader_path.write_text(
        f"# Loader that diffusers runs for `from_pretrained(..., trust_remote_code=True)`, because model_index.json\n"
        f'# names the "{library_name}" library for this component. It needs {library_name} installed.\n'
        f"from {library_name} import {class_name}\n"
        f"\n"
        f'__all__ = ["{class_name}"]\n',
        encoding="utf-8",
    )
    logger.info("Wrote the remote-code loader %s", loader_path)
    return loader_path
