"""MALoRA runtime: adapters, kernels, the reference layer and the serving engine."""

from .cpu_features import apply_isa_cap

__version__ = "0.1.0"

apply_isa_cap()  # before torch computes anything: oneDNN and ATen read the cap once, at their first use
