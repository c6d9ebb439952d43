"""hypernorm: HyperNorm (HN) and batch HyperNorm (BHN), a drop-in normalization with a relayed meta LSTM."""
from .nn import HyperNorm, convert

__version__ = "0.1.0"

__all__ = ["HyperNorm", "convert", "__version__"]
