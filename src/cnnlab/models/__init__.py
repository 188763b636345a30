"""Models: the registry and the networks in it. Importing the modules below registers them."""

from cnnlab.models import fastnet, simple_cnn  # noqa: F401  (register the fast networks, custom CNNs, presets)
from cnnlab.models.pretrained import FAMILIES, alias_entries, dynamic_entry
from cnnlab.models.registry import (add_entry, create_model, get_entry, list_families, list_models, load_state,
                                    register_model, register_prefix)

for _entry in alias_entries():
    add_entry(_entry)
for _prefix, _description in FAMILIES.items():  # timm:NAME, tv:NAME
    register_prefix(_prefix, dynamic_entry, _description)

__all__ = ["create_model", "get_entry", "list_families", "list_models", "load_state", "register_model",
           "register_prefix"]
