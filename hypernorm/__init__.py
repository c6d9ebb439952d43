"""hypernorm: HyperNorm (HN) and batch HyperNorm (BHN), a drop-in normalization with a relayed meta LSTM."""
from .analysis import complexity
from .models import create_model, list_models
from .nn import HyperNorm, convert

__version__ = "0.1.0"

__all__ = ["HyperNorm", "complexity", "convert", "create_model", "list_models", "__version__"]
