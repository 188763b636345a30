"""The shipped study configs follow their seed reports' protocols (../shared/seeds/).

Every expected value below is written from the report's own text, with the report file and the
phrase it comes from; a value the report does not give is marked "chosen" with the reason (the
same choice the config file's comment states). Nothing trains: the studies are loaded and their
resolved configs, training phases and per-epoch learning rates are compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cnnlab.core.config import load_config
from cnnlab.core.study import load_study
from cnnlab.models.layers import build_layers
from cnnlab.models.registry import get_entry
from cnnlab.train.optim import lr_factor
from cnnlab.train.phases import plan_phases

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
R000 = "000_2cb19c190758cfcd.txt"  # (002_1e7ba53184119adf.txt is another extraction of the same report)
R001 = "001_3b86280a8c556123.txt"
R003 = "003_094ba905e6310a39.txt"
R004 = "004_abeefbd113ce03be.txt"
CIFAR = ""  # data.path "" = the shared CIFAR-10 copy, which ships its own 10,000-image test/ folder


def phase(name: str, *segments: tuple[int, int, float], unfreeze=None) -> tuple:
    """A training phase: its name, its learning rate per run of epochs (first, last, lr), what trains."""
    return name, tuple(segments), unfreeze


def _image_size(cfg) -> int:
    """The side the run decodes its images at (train/setup.build_model: pretrained -> input_size, else the net's)."""
    if cfg.model.pretrained:
        return cfg.data.image_size or cfg.model.input_size
    return cfg.data.image_size or get_entry(cfg.model.name).default_size


def _phases(cfg) -> list[tuple]:
    """The planned phases, each with its learning rate epoch by epoch folded into runs of equal lr."""
    out = []
    for ph in plan_phases(cfg, transfer=cfg.model.pretrained):
        segments: list[list] = []
        for epoch in range(1, ph.train.epochs + 1):
            lr = ph.train.lr * lr_factor(epoch - 1, 1, ph.train)
            if segments and segments[-1][2] == pytest.approx(lr, rel=1e-9):
                segments[-1][1] = epoch
            else:
                segments.append([epoch, epoch, lr])
        out.append((ph.name, tuple(tuple(s) for s in segments), ph.unfreeze))
    return out


ACTUAL = {
    "data_path": lambda c: c.data.path,
    "val_fraction": lambda c: c.data.val_fraction,
    "test_fraction": lambda c: c.data.test_fraction,
    "split_seed": lambda c: c.data.split_seed,
    "augment": lambda c: c.data.augment,
    "image_size": _image_size,
    "model": lambda c: c.model.name,
    "layers": lambda c: c.model.layers,
    "pretrained": lambda c: c.model.pretrained,
    "input_size": lambda c: c.model.input_size,
    "head": lambda c: c.model.head,
    "head_hidden": lambda c: c.model.head_hidden,
    "dropout": lambda c: c.model.dropout,
    "optimizer": lambda c: c.train.optimizer,
    "batch_size": lambda c: c.train.batch_size,
    "seed": lambda c: c.train.seed,
    "feature_views": lambda c: c.train.feature_views,
    "phases": _phases,  # epochs, learning rates (with the schedule) and frozen/fine-tuned, per phase
}


def _mismatches(name: str, cfg, want: dict) -> list[str]:
    bad = []
    for key, expected in want.items():
        got = ACTUAL[key](cfg)
        if key == "phases":
            ok = len(got) == len(expected) and all(
                g[0] == e[0] and g[2] == e[2] and len(g[1]) == len(e[1])
                and all(gs[:2] == es[:2] and gs[2] == pytest.approx(es[2], rel=1e-9) for gs, es in zip(g[1], e[1]))
                for g, e in zip(got, expected))
        elif isinstance(expected, float):
            ok = got == pytest.approx(expected, rel=1e-9)
        elif isinstance(expected, (tuple, list)):
            ok = tuple(got) == tuple(expected)
        else:
            ok = got == expected
        if not ok:
            bad.append(f"{name}: {key} is {got!r}, the report's protocol is {expected!r}")
    return bad


def _check_study(file: str, expected: dict[str, dict], sets=()) -> None:
    study = load_study(CONFIGS / file, sets)
    children = {c.name: c.config for c in study.children}
    assert sorted(children) == sorted(expected), f"{file}: runs {sorted(children)}, expected {sorted(expected)}"
    bad = [m for name, want in expected.items() for m in _mismatches(name, children[name], want)]
    assert not bad, f"{file} differs from its report:\n" + "\n".join(bad)


# --------------------------------------------------------------------------------------------- 000
R000_CNN = {
    "data_path": CIFAR,  # chosen (report silent on its split): CIFAR-10's own 50,000 / 10,000
    "val_fraction": 0.1,  # chosen: the report logs "Val Loss" without its size; cnnlab's default 10%
    "split_seed": 0,  # chosen: no seed in the report
    "augment": ("crop", "flip"),  # chosen: the report names no augmentation; cnnlab's default
    "image_size": 32,  # R000 "Input Features: 2048 [128 * (32/8) * (32/8)]": 32 px images
    "model": "report000_cnn",  # R000 "CNN Model": 3 x Conv5x5 + BN + ReLU + MaxPool, 32/64/128
    "pretrained": False,
    "optimizer": "adam",  # R000 "Why have we chosen Adam Optimizer over SGD?"
    "batch_size": 64,  # chosen: not in the report (configs/report000.yaml and RESULTS.md measured 64)
}
R000_PRETRAINED = {
    **R000_CNN,
    "image_size": 32,  # chosen: the whole 32 px image, no centre crop (the report shows no resize)
    "pretrained": True,  # R000 "Pre-trained Models ... fine-tuning these models"
    "input_size": 64,  # chosen: the report gives none; 64 px keeps the runs CPU-sized
    "head": "linear",  # chosen: torchvision's classifier replaced by one linear layer
}


def test_study_report000_follows_report_000():
    lrs = {  # R000 "Learning rate = 0.00025" and "For different learning rates": 0.0001, 0.001, 0.01, 0.1
        "cnn-lr0.00025": 0.00025, "cnn-lr0.0001": 0.0001, "cnn-lr0.001": 0.001, "cnn-lr0.01": 0.01, "cnn-lr0.1": 0.1}
    expected = {
        # R000 each learning rate's log runs "Epoch [1/20]" .. "Epoch [20/20]"
        name: {**R000_CNN, "phases": [phase("scratch", (1, 20, lr))]} for name, lr in lrs.items()}
    for name, model in (("resnet18-finetuned", "resnet18"), ("densenet121-finetuned", "densenet121"),
                        ("googlenet-finetuned", "googlenet")):
        # R000 "ResNet", "Densenet", "Googlenet": depths chosen (ResNet-18, DenseNet-121; GoogLeNet has one)
        # R000 "We used only 10 epochs when fine-tuning these models": every layer trains (unfreeze all);
        # the learning rate is not given: 1e-4 chosen
        expected[name] = {**R000_PRETRAINED, "model": model,
                          "phases": [phase("finetune", (1, 10, 1e-4), unfreeze="all")]}
    _check_study("study_report000.yaml", expected)


def test_report000_config_follows_report_000():
    cfg = load_config(CONFIGS / "report000.yaml")
    want = {**R000_CNN, "data_path": "../shared/data/cifar10",
            "phases": [phase("scratch", (1, 20, 0.00025))]}  # R000 "Learning rate = 0.00025", "Epoch [1/20]"
    bad = _mismatches("report000.yaml", cfg, want)
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------- 001
R001_BASE = {
    "data_path": "realwaste",  # R001 1.2 "the RealWaste dataset, downloaded from the UCI Machine Learning Repository"
    # R001 1.5 "a ratio of 60:20:20": train_ratio = 0.60, val_ratio = 0.20, test_ratio = 0.20
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "split_seed": 42,  # R001 1.5 train_test_split(..., stratify=df['Class'], random_state=42)
    "augment": (),  # R001 Listing 4: train_datagen = ImageDataGenerator(rescale=1./255) only
    "optimizer": "adam",  # R001 Listing 5 tf.keras.optimizers.Adam; 2.3 optimizer='adam'
    "batch_size": 32,  # R001 Listing 4 batch_size=32 (the pretrained runs: 89 steps x 32 = 2,848 images)
    "seed": 42,  # R001 Listing 5 "# Set random seed for reproducibility" seed = 42
}
R001_CNN = {
    **R001_BASE,
    "model": "report001_cnn",  # R001 Listing 5: 2 x (Conv2D 3x3 same + BN + ReLU + MaxPool), Dense 128, 64, 9
    "pretrained": False,
    "image_size": 256,  # R001 Listing 4 width = 256, height = 256
}
R001_PRETRAINED = {
    **R001_BASE,
    "pretrained": True,  # R001 2.2 weights='imagenet'
    "input_size": 524,  # R001 2.2 input_shape=(524, 524, 3)
    "image_size": 524,  # R001 2.2 the same (RealWaste's photos are 524x524)
    # R001 2.2 GlobalAveragePooling2D -> Dense(128, activation='relu') -> Dense(9, activation='softmax')
    "head": "mlp",
    "head_hidden": 128,
    "dropout": 0.0,
    "feature_views": 1,  # chosen: no mirror copy of the cached features, the report has no augmentation
}


def test_study_report001_follows_report_001(tmp_path):
    expected = {
        # R001 Listing 5 Adam(learning_rate=0.001) and Listing 6 epochs=20: the model of "Test Accuracy: 0.6183"
        "cnn": {**R001_CNN, "phases": [phase("scratch", (1, 20, 0.001))]},
        # R001 1.14 "different learning rates: 0.0001, 0.001, 0.01, and 0.1 ... over 5 epochs"
        **{f"cnn-lr-comparison-lr{lr:g}": {**R001_CNN, "phases": [phase("scratch", (1, 5, lr))]}
           for lr in (0.0001, 0.001, 0.01, 0.1)},
    }
    for name, model in (("inceptionresnetv2-frozen", "inceptionresnetv2"), ("densenet121-frozen", "densenet121")):
        # R001 2.2 "for layer in ....layers: layer.trainable = False"; 2.3 optimizer='adam' (Keras' default
        # learning rate 0.001), epochs=10; no second phase
        expected[name] = {**R001_PRETRAINED, "model": model, "phases": [phase("frozen", (1, 10, 0.001), unfreeze=0)]}
    _check_study("study_report001.yaml", expected)
    # RealWaste is not on this machine: pointing the study at a folder keeps every other setting
    _check_study("study_report001.yaml", {n: {**w, "data_path": str(tmp_path)} for n, w in expected.items()},
                 sets=[f"data.path={tmp_path}"])


# --------------------------------------------------------------------------------------------- 003
R003_BASE = {
    "data_path": CIFAR,  # R003 16.2 "divided into 50,000 training images and 10,000 test images"
    "val_fraction": 0.2,  # R003 4 "a validation split of 20%"
    "split_seed": 0,  # chosen: Keras' validation_split is unshuffled, so the report has no seed
    "augment": (),  # R003 3 only "normalized the pixel values of the images to the range [0, 1]"
    "optimizer": "adam",  # R003 4 "compiled using the Adam optimizer"; 7.2.2.6 / 7.2.3.6 "Optimizer: Adam"
    "batch_size": 32,  # R003 4 "a batch size of 32"; 17.5 "Trained for 10 epochs with a batch size of 32"
    "image_size": 32,  # R003 1 "60,000 32x32 color images"; 8: only InceptionV3 needed resizing
}
R003_PRETRAINED = {
    **R003_BASE,
    "pretrained": True,  # R003 7.2.2.5 "(Pre-trained on ImageNet)"; 17.3 "pre-trained on the ImageNet dataset"
    "input_size": 32,  # R003 8 "InceptionV3 ... expected a minimum input size of at least 75x75 ... we resized"
    "head": "linear",  # R003 17.3 "a Flatten layer followed by a Dense layer with 10 output units"
}


def test_study_report003_follows_report_003():
    expected = {
        # R003 4 "Training was performed over 10 epochs"; the learning rate is not given: Keras' Adam default
        "cnn": {**R003_BASE, "model": "report003_cnn", "pretrained": False,
                "phases": [phase("scratch", (1, 10, 0.001))]},
        # R003 7.2.1.6 "Epochs: 50", "Constant at 0.001 for the first 28 epochs, then reduced to 0.0002";
        # frozen chosen (7.2.1.12 "Further optimizations and fine-tuning could potentially improve")
        "resnet18-frozen": {**R003_PRETRAINED, "model": "resnet18", "feature_views": 1,
                            "phases": [phase("frozen", (1, 28, 0.001), (29, 50, 0.0002), unfreeze=0)]},
        # R003 7.2.2.6 "Epochs: 50", "Optimizer: Adam", "Constant at 0.001 for all epochs";
        # 7.2.2.9 "Despite data augmentation"; frozen: 7.2.2.10 "Fine-tuning the pre-trained VGG model ... could"
        "vgg16-frozen": {**R003_PRETRAINED, "model": "vgg16", "augment": ("crop", "flip"), "feature_views": 2,
                         "phases": [phase("frozen", (1, 50, 0.001), unfreeze=0)]},
        # R003 7.2.3.6 "Epochs: 50", "Constant at 0.001 for the first 30 epochs, then reduced to 2e-4"
        # (its later 4e-5 has no epoch and cnnlab's step schedule one period); 7.2.3.8 "Data augmentation
        # helped"; frozen: 7.2.3.10 "Fine-tuning the pre-trained MobileNet weights ... might enhance"
        "mobilenet-frozen": {**R003_PRETRAINED, "model": "mobilenet", "augment": ("crop", "flip"), "feature_views": 2,
                             "phases": [phase("frozen", (1, 30, 0.001), (31, 50, 0.0002), unfreeze=0)]},
        # R003 17.4 "all layers were frozen"; 17.5 "Trained for 10 epochs" (Adam, Keras' default 0.001);
        # 18 "unfroze the last 4 layers", "Recompiled the model with a reduced learning rate" (a tenth chosen),
        # "Trained for 10 additional epochs"
        "vgg16-frozen-finetuned": {**R003_PRETRAINED, "model": "vgg16", "feature_views": 1,
                                   "phases": [phase("frozen", (1, 10, 0.001), unfreeze=0),
                                              phase("finetune", (1, 10, 0.0001), unfreeze=4)]},
    }
    _check_study("study_report003.yaml", expected)


# --------------------------------------------------------------------------------------------- 004
# R004 "VGG16 Model: Building Architecture" (a small network, not VGG16): Conv2D 32/64/128 (896, 18,496,
# 73,856 parameters: 3x3, output 32/16/8 px = 'same') each with MaxPooling2D, Flatten (None, 2048),
# Dense 128 (262,272), Dropout, Dense 10 (1,290); ReLU and the dropout rate 0.5 chosen
R004_SMALL_LAYERS = [{"conv": 32}, "relu", "maxpool", {"conv": 64}, "relu", "maxpool", {"conv": 128}, "relu",
                     "maxpool", "flatten", {"dense": 128}, "relu", {"dropout": 0.5}]
R004_SMALL_PARAMS = 896 + 18_496 + 73_856 + 262_272 + 1_290  # the table's rows
R004_BASE = {
    "data_path": CIFAR,  # R004 "Training Set: Contains 50,000 images", "Test Set: Contains 10,000 images"
    "val_fraction": 0.1,  # chosen: validation curves are plotted without saying on what; cnnlab's default
    "split_seed": 0,  # chosen: no seed in the report
    "augment": (),  # R004 "Data Preprocessing": normalization, one-hot, reshaping; augmentation only as an idea
    "image_size": 32,  # R004 "input_layer (InputLayer) (None, 32, 32, 3)"
    "optimizer": "adam",  # chosen: not in the report; Adam
    "batch_size": 32,  # chosen: not in the report; Keras' fit default (the report is Keras)
}


def test_study_report004_follows_report_004():
    scratch = [phase("scratch", (1, 20, 0.001))]  # chosen: 20 epochs at Keras' Adam default 0.001
    expected = {
        # R004 "Deep CNN Model: Building Architecture": 10 convs 32..512, GAP, Dense 1024 / 512 / 10
        "deep-cnn": {**R004_BASE, "model": "report004_deep", "pretrained": False, "phases": scratch},
        # R004 "VGG Model: Building Architecture": 10 Conv3x3 + BN 64..512, Flatten, Dense 4096 x 2, 10
        "vgg-style": {**R004_BASE, "model": "report004_vgg", "pretrained": False, "phases": scratch},
        "small-cnn": {**R004_BASE, "model": "custom", "layers": R004_SMALL_LAYERS, "pretrained": False,
                      "phases": scratch},
        "resnet50-224-frozen": {
            **R004_BASE,
            "model": "resnet50",  # R004 "resnet50 (Functional) (None, 7, 7, 2048) 23,587,712"
            "pretrained": True,  # R004 "leverage pre-trained weights from ResNet50"
            "input_size": 224,  # R004 "up_sampling2d (UpSampling2D) (None, 224, 224, 3)"
            # R004 global_average_pooling2d -> dense (None, 1024) -> dense_1 (None, 512) -> classification:
            # model.head mlp has one hidden layer, the first one (1024); the 512 one cannot be expressed
            "head": "mlp",
            "head_hidden": 1024,
            "feature_views": 1,  # chosen: no mirror copy of the cached features, the report has no augmentation
            # R004 "most layers frozen to retain learned features, while the dense layers are trainable";
            # 10 epochs chosen (not in the report)
            "phases": [phase("frozen", (1, 10, 0.001), unfreeze=0)],
        },
    }
    _check_study("study_report004.yaml", expected)


def test_report004_small_cnn_has_the_reports_parameter_count():
    net = build_layers(R004_SMALL_LAYERS, 10, 32)
    assert sum(p.numel() for p in net.parameters()) == R004_SMALL_PARAMS == 356_810


# --------------------------------------------------------------------------------------------- all
CHECKED = {"study_report000.yaml", "study_report001.yaml", "study_report003.yaml", "study_report004.yaml"}


def test_every_shipped_study_is_checked_against_its_report():
    shipped = {p.name for p in CONFIGS.glob("study_*.yaml")}
    assert shipped == CHECKED, f"study files without a protocol test: {sorted(shipped - CHECKED)}"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    raw = yaml.safe_load(path.read_text())
    if "runs" in raw:  # a study file
        study = load_study(path)
        assert study.children and all(c.config.train.epochs >= 1 for c in study.children)
    else:
        assert load_config(path).train.epochs >= 1
