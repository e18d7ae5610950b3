"""How a run spreads over processes and devices: strategies, ZeRO detection and gathers, precision, memory."""
