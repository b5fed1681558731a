"""hpo: hyperparameter optimization for PyTorch, from one YAML file, on Optuna."""

import os

# Idle OpenMP threads sleep instead of spinning. Workers share cores with each other and with
# whatever else runs; spinning threads then steal the cores the work needs. Measured on the
# digits study (2 cores, 2 torch threads, one other busy process): 132 s spinning, 23 s passive;
# on an otherwise idle machine the two are within noise. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
