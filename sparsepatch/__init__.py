"""sparsepatch: keep huge sparse files in sync with small, safe, offline patches."""

from .api import (
           DEFAULT_BLOCK_SIZE,
           ApplyStats,
           DiffStats,
           SignatureStats,
           apply,
           check,
           diff,
           info,
           signature,
)
from .errors import SparsePatchError

__version__ = "0.1.0"
__all__ = ["signature", "diff", "apply", "info", "check", "SparsePatchError", "ApplyStats",
           "DiffStats", "SignatureStats", "DEFAULT_BLOCK_SIZE", "__version__"]
