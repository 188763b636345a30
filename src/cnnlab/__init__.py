"""cnnlab: image classification with convolutional networks, one command per step.

The stages a user knows are the sub-packages (data, models, train, evaluate); `api` holds the
verbs and `cli` is a thin argparse layer over them.
"""

__version__ = "0.1.0"
