"""MALoRA runtime: adapters, kernels, the reference layer and the serving engine."""

__version__ = "0.1.0"
