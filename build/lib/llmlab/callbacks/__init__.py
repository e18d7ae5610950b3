"""Callbacks: run summary (summary.json, loss.png), sample generation, HF export."""
