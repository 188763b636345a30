"""Training: optimizers and schedules, and the fit loop (early stopping, divergence checks)."""
