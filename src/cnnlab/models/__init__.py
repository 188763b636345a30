"""Models: the registry and the networks in it. Importing the modules below registers them."""

from cnnlab.models import fastnet, simple_cnn  # noqa: F401  (register the fast networks, custom CNNs, presets)
from cnnlab.models.pretrained import alias_entries
from cnnlab.models.registry import add_entry, create_model, get_entry, list_models, register_model

for _entry in alias_entries():
    add_entry(_entry)

__all__ = ["create_model", "get_entry", "list_models", "register_model"]
