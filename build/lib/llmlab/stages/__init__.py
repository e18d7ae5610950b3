"""One LightningModule per training stage; shared pieces live in common.py as functions."""
