"""Model merging through mergekit driven by a Hydra config: own issue."""
