"""hpo: hyperparameter optimization for PyTorch, from one YAML file, on Optuna."""

__version__ = "0.1.0"
