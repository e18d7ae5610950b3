"""Atomic writes, checkpoints (saving, finding the newest intact one, reading weights), resume, the run dir."""
