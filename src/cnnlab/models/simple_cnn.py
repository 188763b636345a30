"""Custom CNNs: `custom` (layers from the config) and the seed reports' networks as presets.

Each preset is the layer list its report describes (see `../shared/seeds/`), so `cnnlab summary`
can be checked against the reports' tables. Where a report is silent (dropout rates, padding),
the choice is stated next to the preset.
"""

from __future__ import annotations

from cnnlab.core.errors import UserError
from cnnlab.models.layers import build_layers
from cnnlab.models.registry import register_model


def _cbr(filters, kernel=3, padding="same", bias=True, bn=True):
    return [{"conv": {"filters": filters, "kernel": kernel, "padding": padding, "bias": bias}}] + (["bn"] if bn else []) + ["relu"]


PRESETS = {
    # 000: 3 x (Conv5x5 pad 2 + BN + ReLU + MaxPool 2), 32/64/128; Dense 64 + Dropout 0.5.
    # Its parameter sum (390,634) counts no conv bias: BN follows each conv, so bias=False.
    "report000_cnn": [*_cbr(32, 5, 2, False), "maxpool", *_cbr(64, 5, 2, False), "maxpool",
                      *_cbr(128, 5, 2, False), "maxpool", "flatten", {"dense": 64}, "relu", {"dropout": 0.5}],
    # 001 (RealWaste, 256x256): 2 x (Conv3x3 same + BN + ReLU + MaxPool), 32/64; Dense 128, 64.
    "report001_cnn": [*_cbr(32), "maxpool", *_cbr(64), "maxpool", "flatten", {"dense": 128}, "relu",
                      {"dense": 64}, "relu"],
    # 003: Conv3x3 32/64/128 + BN + ReLU, max-pool after the first two; Dense 512 + Dropout 0.5.
    # The report is in Keras and gives no padding: Keras' default 'valid' is used.
    "report003_cnn": [*_cbr(32, padding="valid"), "maxpool", *_cbr(64, padding="valid"), "maxpool",
                      *_cbr(128, padding="valid"), "flatten", {"dense": 512}, "relu", {"dropout": 0.5}],
    # 004 "deep CNN": 5 blocks of two convs (32..512), BN after the first conv of each block,
    # max-pool + dropout per block, GAP, Dense 1024/512 with dropout. Dropout rates are not
    # given: 0.25 after conv blocks, 0.5 after dense layers.
    "report004_deep": [
        *_cbr(32, 5), *_cbr(32, bn=False), "maxpool", {"dropout": 0.25},
        *[layer for f in (64, 128, 256, 512) for layer in (*_cbr(f), *_cbr(f, bn=False), "maxpool", {"dropout": 0.25})],
        "gap", {"dense": 1024}, "relu", {"dropout": 0.5}, {"dense": 512}, "relu", {"dropout": 0.5},
    ],
    # 004 "VGG-style": 5 blocks of two Conv3x3 + BN + ReLU (64..512), max-pool each block,
    # Flatten, Dense 4096 x 2 with dropout 0.5.
    "report004_vgg": [
        *[layer for f in (64, 128, 256, 512, 512) for layer in (*_cbr(f), *_cbr(f), "maxpool")],
        "flatten", {"dense": 4096}, "relu", {"dropout": 0.5}, {"dense": 4096}, "relu", {"dropout": 0.5},
    ],
    # The default for small images until the fast recipe lands: 4 conv stages, GAP, linear.
    "cnn_small": [*_cbr(32, bias=False), *_cbr(64, bias=False), "maxpool", *_cbr(128, bias=False), "maxpool",
                  *_cbr(256, bias=False), "maxpool", "gap"],
}


@register_model(default_size=32, description="layers from the config's model.layers (see models/layers.py)")
def custom(num_classes, image_size, layers=()):
    if not layers:
        raise UserError("model 'custom' needs model.layers in the config (a list of layers)")
    return build_layers(list(layers), num_classes, image_size)


PRESET_INFO = {  # name: (default input side in pixels, description)
    "report000_cnn": (32, "report 000: 3 x Conv5x5-BN-ReLU-MaxPool (32/64/128), Dense 64, 390,634 params at 32 px"),
    "report001_cnn": (256, "report 001 (RealWaste): 2 x Conv3x3-BN-ReLU-MaxPool (32/64), Dense 128/64, at 256 px"),
    "report003_cnn": (32, "report 003: Conv3x3 32/64/128 with BN, pool after the first two, Dense 512"),
    "report004_deep": (32, "report 004 'deep CNN': 10 convs 32..512, GAP, Dense 1024/512"),
    "report004_vgg": (32, "report 004 'VGG-style': 10 Conv3x3-BN 64..512, Dense 4096 x 2"),
    "cnn_small": (32, "default small CNN: Conv3x3-BN-ReLU 32/64/128/256 with pooling, GAP"),
}


def _register_preset(name: str, size: int, description: str) -> None:
    def build(num_classes, image_size):
        return build_layers(PRESETS[name], num_classes, image_size)

    build.__name__ = name
    register_model(default_size=size, description=description)(build)


for _name, (_size, _description) in PRESET_INFO.items():
    _register_preset(_name, _size, _description)
