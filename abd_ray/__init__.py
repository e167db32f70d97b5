"""abd-ray: backdoor transfer in data-free knowledge distillation, and the ABD defense, as distributed studies."""

__version__ = "0.1.0"
