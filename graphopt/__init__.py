"""graphopt: a torch.compile backend. Use `torch.compile(model, backend="graphopt")`."""

from graphopt.options import Options, OptionsError

__version__ = "0.1.0"
__all__ = ["Options", "OptionsError", "__version__"]
