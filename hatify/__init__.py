"""hatify: turn any PyTorch nn.Module into a Hard-Attention-to-the-Task continual learner.

    >>> import hatify
    >>> hat = hatify.hatify(model, num_tasks=5, example_inputs=(x,))
"""
from .config import HATConfig
from .convert import explain, hatify
from .errors import HatifyError, HatifyWarning, ValidationFailed
from .io import load, save
from .model import HATModel
from .validate import ValidationResult, masks_open, validate

__version__ = "0.1.0"

__all__ = ["HATConfig", "HATModel", "HatifyError", "HatifyWarning", "ValidationFailed", "ValidationResult", "explain", "hatify", "load", "masks_open",
           "save", "validate", "__version__"]
