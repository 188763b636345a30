"""cnnlab: image classification with convolutional networks, one command per step.

The stages a user knows are the sub-packages (data, models, train, evaluate); `api` holds the
verbs and `cli` is a thin argparse layer over them.
"""

import time

__version__ = "0.1.0"
# When this process first imported cnnlab: for the `cnnlab` command, its start (before torch is imported),
# which is where `cnnlab train --time-budget` counts from.
STARTED = time.monotonic()
