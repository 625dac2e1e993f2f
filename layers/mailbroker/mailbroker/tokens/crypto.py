"""Envelope encryption of cached tokens with the stack's KMS key.

Each execution environment asks KMS for one AES-256 data key (``GenerateDataKey``) and reuses it
for ``data_key_max_age`` seconds; tokens are sealed with AES-GCM under that key, bound to their
cache key as associated data, and stored with the KMS-encrypted copy of the data key. A reader
decrypts a data key once (``Decrypt``) and keeps it in memory, so a warm DynamoDB hit costs no KMS
call. Read access to the table alone yields nothing usable.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mailbroker.errors import AwsUnavailable

_CONTEXT = {"purpose": "mailbroker-token-cache"}


@dataclass(frozen=True)
class Sealed:
    ciphertext: bytes
    nonce: bytes
    encrypted_key: bytes


class TokenCipher:
    def __init__(
        self,
        kms_client: Any,
        key_id: str,
        *,
        data_key_max_age: float = 3600.0,
        max_cached_keys: int = 32,
    ) -> None:
        self._kms = kms_client
        self._key_id = key_id
        self._max_age = data_key_max_age
        self._max_cached = max_cached_keys
        self._current: tuple[bytes, bytes, float] | None = None  # (plaintext, encrypted, created)
        self._known: OrderedDict[bytes, bytes] = OrderedDict()  # encrypted data key -> plaintext
        self._lock = threading.Lock()

    def seal(self, plaintext: bytes, aad: bytes) -> Sealed:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key, encrypted = self._data_key()
        nonce = os.urandom(12)
        return Sealed(AESGCM(key).encrypt(nonce, plaintext, aad), nonce, encrypted)

    def open(self, sealed: Sealed, aad: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = self._plaintext_key(sealed.encrypted_key)
        return AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, aad)

    def _data_key(self) -> tuple[bytes, bytes]:
        with self._lock:
            if self._current and time.monotonic() - self._current[2] < self._max_age:
                return self._current[0], self._current[1]
        try:
            answer = self._kms.generate_data_key(
                KeyId=self._key_id, KeySpec="AES_256", EncryptionContext=_CONTEXT
            )
        except Exception as exc:  # botocore errors: throttling, key disabled, network
            raise AwsUnavailable(f"KMS GenerateDataKey failed: {type(exc).__name__}") from exc
        plaintext, encrypted = answer["Plaintext"], answer["CiphertextBlob"]
        with self._lock:
            self._current = (plaintext, encrypted, time.monotonic())
            self._remember(encrypted, plaintext)
        return plaintext, encrypted

    def _plaintext_key(self, encrypted: bytes) -> bytes:
        with self._lock:
            key = self._known.get(encrypted)
            if key is not None:
                self._known.move_to_end(encrypted)
                return key
        try:
            answer = self._kms.decrypt(
                CiphertextBlob=encrypted, KeyId=self._key_id, EncryptionContext=_CONTEXT
            )
        except Exception as exc:
            raise AwsUnavailable(f"KMS Decrypt failed: {type(exc).__name__}") from exc
        plaintext: bytes = answer["Plaintext"]
        with self._lock:
            self._remember(encrypted, plaintext)
        return plaintext

    def _remember(self, encrypted: bytes, plaintext: bytes) -> None:
        self._known[encrypted] = plaintext
        self._known.move_to_end(encrypted)
        while len(self._known) > self._max_cached:
            self._known.popitem(last=False)

    def __repr__(self) -> str:
        return f"TokenCipher(key_id={self._key_id!r})"
