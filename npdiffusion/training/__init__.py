"""Training: configs, checkpoints, the generic loop and the stages (docs/training.md)."""
