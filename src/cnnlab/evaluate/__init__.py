"""Evaluation: predictions, metrics (scikit-learn), plots and the run report."""
