"""Training: the typed step and loop, losses, methods (SFT, preference, GRPO), run folders, resume,
distributed, callbacks, memory and the dry-run estimate."""
