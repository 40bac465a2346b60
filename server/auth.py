"""Optional API keys: `Authorization: Bearer <key>`, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="API key, when the server has keys set")


class KeyChecker:
    """Compares SHA-256 digests with `hmac.compare_digest` against every key, so neither
    the key length nor which key matched shows in the timing."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, token: str) -> bool:
        candidate = hashlib.sha256(token.encode()).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    checker: KeyChecker = request.app.state.keys
    if not checker.enabled:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       type="invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not checker.check(credentials.credentials):
        raise APIError(401, "incorrect API key provided", type="invalid_request_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
