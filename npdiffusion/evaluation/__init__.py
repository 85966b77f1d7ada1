"""Quality checks of generated images (docs/training.md, "Quality checks")."""
