"""sparsepatch: keep huge sparse files in sync with small, safe, offline patches."""

from .api import (
    DEFAULT_BLOCK_SIZE,
    ApplyStats,
    DiffStats,
    MergeStats,
    SignatureStats,
    VerifyStats,
    apply,
    check,
    diff,
    info,
    merge,
    signature,
    verify,
)
from .errors import SparsePatchError

__version__ = "0.1.0"
__all__ = ["signature", "diff", "apply", "merge", "info", "verify", "check", "SparsePatchError",
           "ApplyStats", "DiffStats", "MergeStats", "SignatureStats", "VerifyStats",
           "DEFAULT_BLOCK_SIZE", "__version__"]
