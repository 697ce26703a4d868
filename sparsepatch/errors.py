"""The one exception tree. Every error a user can meet is a SparsePatchError subclass with an exit code."""

from __future__ import annotations


class SparsePatchError(Exception):
    """Root of every error the tool reports as one line."""

    exit_code = 1


class UsageError(SparsePatchError):
    """The command was given arguments that cannot work together."""

    exit_code = 2


class IOFailure(SparsePatchError):
    """Reading or writing a path failed (missing file, permission, no space)."""

    exit_code = 3


class FormatError(SparsePatchError):
    """The input is not a well-formed signature or patch."""

    exit_code = 4


class BadMagic(FormatError):
    """The input starts with bytes that are neither a signature nor a patch."""


class UnsupportedVersion(FormatError):
    """The input uses a format version or flag this build does not know."""


class Truncated(FormatError):
    """The input ends before its trailer."""


class ChecksumMismatch(FormatError):
    """A CRC-32C or BLAKE3 check over the input failed."""


class AuthenticationError(FormatError):
    """A keyed patch MAC is missing, unexpected or does not match."""


class WrongBase(SparsePatchError):
    """The destination is not the file the signature was taken from."""

    exit_code = 5


class SourceChanged(SparsePatchError):
    """The source changed while diff was reading it."""

    exit_code = 6


class Locked(SparsePatchError):
    """Another apply holds the destination."""

    exit_code = 7


class VerifyMismatch(SparsePatchError):
    """A file does not match the signature or patch target it was checked against."""

    exit_code = 8


class KeyRequired(AuthenticationError):
    """A patch carries a MAC and no key was given to check it."""
