"""The patch MAC (spec section 5.5): key derivation and the tag chain. Which patches need a
key is the caller's policy, not the codec's."""

from __future__ import annotations

import blake3

from ..errors import FormatError
from .base import MAC_CONTEXT, MIN_KEY_FILE


def derive_mac_key(material: bytes) -> bytes:
    """The 32-byte MAC key from a key file's bytes (any length >= MIN_KEY_FILE)."""
    if len(material) < MIN_KEY_FILE:
        raise FormatError(f"key file holds {len(material)} bytes; at least {MIN_KEY_FILE} are needed")
    key: bytes = blake3.blake3(material, derive_key_context=MAC_CONTEXT).digest()
    return key


class MacChain:
    """tag_0 = MAC(K, header); tag_i = MAC(K, tag_{i-1} || element_i): each tag authenticates
    its element and everything before it, so nothing can be dropped, reordered or spliced."""

    def __init__(self, key: bytes):
        self.key = key
        self.tag = b""

    def hasher(self) -> blake3.blake3:
        return blake3.blake3(self.tag, key=self.key)

    def next(self, *parts: bytes) -> bytes:
        h = self.hasher()
        for part in parts:
            h.update(part)
        self.tag = h.digest()
        return self.tag
