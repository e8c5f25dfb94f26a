"""Hub integration: registration with diffusers' pipeline loader and the remote-code loader file for Hub repos."""

from .loading import COMPONENT_CLASS_NAMES, LIBRARY_NAME, register_with_diffusers, write_remote_code_loader
from .model_card import CARD_TAGS, render_model_card


__all__ = [
    "CARD_TAGS",
    "COMPONENT_CLASS_NAMES",
    "LIBRARY_NAME",
    "register_with_diffusers",
    "render_model_card",
    "write_remote_code_loader",
]
