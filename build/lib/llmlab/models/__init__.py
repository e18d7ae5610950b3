"""Models: build from a config node, PEFT, tiny bases, export, quantized formats, loading what a user points at."""
