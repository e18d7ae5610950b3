"""Every rule checked before weights load, one file per config group (the entry points: entry.py)."""
