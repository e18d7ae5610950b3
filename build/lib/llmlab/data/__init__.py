"""Data: sources (builtin/text/hub), stage formats, packing, and the LightningDataModule."""
