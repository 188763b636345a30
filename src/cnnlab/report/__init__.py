"""Reports over several runs: the comparison table, figures and text (reads files only)."""
