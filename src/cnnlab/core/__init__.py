"""Configuration, run folders and the process environment: what every stage shares."""
