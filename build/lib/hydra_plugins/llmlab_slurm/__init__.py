"""`llmlab_slurm`: hydra-submitit-launcher's Slurm launcher with llmlab's checks and per-job resources.

Chosen by `launcher=slurm` (conf/launcher/slurm.yaml). Importing this package (Hydra's plugin scan
does at every start) imports neither submitit nor torch.
"""
