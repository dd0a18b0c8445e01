"""luffy's trainer: the LUFFY objective, rollouts on vLLM, the training loop, MLflow tracking.

Importing this package (or `luffy_trainer.config`) does not import torch; the modules that need it import it
themselves.
"""

__version__ = "0.1.0"
