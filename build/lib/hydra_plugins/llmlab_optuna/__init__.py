"""llmlab's Optuna sweeper for Hydra (modern optuna, ask/tell, resumable).

Select it with ``hydra/sweeper: llmlab_optuna`` (defaults list) or ``hydra/sweeper=llmlab_optuna``
on the command line. See ``config.py`` for the options and ``_search_space.py`` for the syntax.
"""

__version__ = "0.1.0"
