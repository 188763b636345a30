"""Calibrated probabilities by temperature scaling (Guo et al., 2017).

One scalar T is fitted on the validation split's logits by minimising the negative log-likelihood;
every probability that leaves cnnlab is then softmax(logits / T). Dividing by a positive scalar never
changes which class is largest, so accuracy is unchanged; only how sure the model says it is changes
(label smoothing, for one, trains a model to say less than it knows).
"""

from __future__ import annotations

import numpy as np
import torch

from cnnlab.evaluate.metrics import cross_entropy, expected_calibration_error

LOG_T_RANGE = (-4.0, 4.0)  # T from 0.018 to 55: far wider than any model needs, and keeps a bad fit finite
MIN_EACH = 5  # right and wrong validation answers needed to fit T


def enough_answers(logits: np.ndarray, targets: np.ndarray) -> bool:
    """Whether these images hold MIN_EACH right and MIN_EACH wrong answers: what a fit needs."""
    return min(_right_wrong(logits, targets)) >= MIN_EACH


def _right_wrong(logits: np.ndarray, targets: np.ndarray) -> tuple[int, int]:
    right = int((logits.argmax(1) == targets).sum()) if len(targets) else 0
    return right, len(targets) - right


def fit_temperature(logits: np.ndarray, targets: np.ndarray, images: str = "validation images") -> tuple[float, str]:
    """The T > 0 that minimises the mean NLL of softmax(logits / T) on these held-out images, and
    what it was fitted on (`images` names them); a bounded scalar search over log T (one parameter
    needs no gradients).

    T = 1 when the images hold fewer than MIN_EACH right or wrong answers: with no mistakes to learn
    from, the NLL only falls as T shrinks, and the "fit" would make every answer certain (seen on
    hymenoptera's 24 validation images, all right: T = 0.018, test NLL 8 times worse).
    """
    from scipy.optimize import minimize_scalar

    right, wrong = _right_wrong(logits, targets)
    if min(right, wrong) < MIN_EACH:
        return 1.0, (f"not fitted: {len(targets)} {images} with {wrong} wrong and {right} right answers "
                     f"(fitting needs at least {MIN_EACH} of each), so T = 1")
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.long)
    found = minimize_scalar(lambda log_t: float(torch.nn.functional.cross_entropy(z / np.exp(log_t), y)),
                            bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-5})
    if min(abs(found.x - bound) for bound in LOG_T_RANGE) < 1e-3:  # no minimum inside: the NLL says nothing
        return 1.0, f"not fitted: the NLL on {len(targets)} {images} has no minimum in range, so T = 1"
    return float(np.exp(found.x)), f"{len(targets)} {images} (NLL)"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities as the Predictor computes them (fp32 softmax of logits / T), as float64."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32) / temperature, 1).double().numpy()


def calibration_record(temperature: float, fitted_on: str, test_targets: np.ndarray, before: np.ndarray,
                       after: np.ndarray) -> dict:
    """What summary.json says of calibration: T, where it was fitted, and the test split's ECE, NLL and
    accuracy from its probabilities before (T = 1) and after."""
    n = max(1, len(test_targets))
    return {"temperature": temperature, "fitted_on": fitted_on,
            "test": {"ece_before": expected_calibration_error(test_targets, before),
                     "ece_after": expected_calibration_error(test_targets, after),
                     "nll_before": cross_entropy(test_targets, before),
                     "nll_after": cross_entropy(test_targets, after),
                     "accuracy_before": float((before.argmax(1) == test_targets).sum() / n),
                     "accuracy_after": float((after.argmax(1) == test_targets).sum() / n)}}
