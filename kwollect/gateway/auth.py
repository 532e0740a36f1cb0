"""Who a request runs as: PostgREST's JWT rules (HS256/384/512, role claim, anonymous role).

Decisions (docs/security.md): a token without `exp` is accepted, as PostgREST does (setup
issues tokens with one unless told --token_expiry_days 0; revoking means rotating the
secret); `exp` and `nbf` are checked with CLOCK_SKEW_S of leeway; a role claim naming a
reserved or invalid role ("none" would reset SET ROLE to the gateway's login) is refused;
claims the database could not be given (integers beyond 64 bits) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from kwollect.gateway.errors import ApiError
from kwollect.gateway.limits import check_role_name

ALGORITHMS = ["HS256", "HS384", "HS512"]
CLOCK_SKEW_S = 30


@dataclass(frozen=True)
class Identity:
    role: str
    claims: dict[str, Any]
    authenticated: bool


def _invalid(message: str) -> ApiError:
    description = message.replace('"', "'")
    return ApiError(401, "PGRST301", message, headers={
        "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'})


def _claim(claims: Any, path: tuple[str | int, ...]) -> Any:
    value = claims
    for step in path:
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                return None
        elif not isinstance(value, dict):
            return None
        value = value[step] if isinstance(step, int) else value.get(step)
    return value


class Authenticator:
    """Verifies bearer tokens; requests without one run as the anonymous role."""

    def __init__(self, secret: bytes | None, anon_role: str | None, audience: str | None,
                 role_claim_path: tuple[str | int, ...]) -> None:
        self._secret = secret
        self._anon_role = anon_role
        self._audience = audience
        self._path = role_claim_path

    def identify(self, authorization: str | None) -> Identity:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            if self._anon_role is None:
                raise ApiError(401, "PGRST302", "Anonymous access is disabled",
                               headers={"WWW-Authenticate": "Bearer"})
            return Identity(self._anon_role, {"role": self._anon_role}, False)
        if self._secret is None:
            raise ApiError(500, "PGRST300", "Server lacks JWT secret")
        claims = self._verify(token.strip(), self._secret)
        role = _claim(claims, self._path)
        if role is None:
            if self._anon_role is None:
                raise ApiError(401, "PGRST302", "Anonymous access is disabled",
                               headers={"WWW-Authenticate": "Bearer"})
            return Identity(self._anon_role, claims, True)
        if not isinstance(role, str) or not role:
            raise _invalid("The JWT role claim must be a non-empty string")
        if not check_role_name(role):
            raise _invalid("The JWT role claim names a reserved or invalid role")
        return Identity(role, claims, True)

    def _verify(self, token: str, secret: bytes) -> dict[str, Any]:
        if token.count(".") != 2:
            raise _invalid(f"Expected 3 parts in JWT; got {token.count('.') + 1}")
        try:
            claims = jwt.decode(token, secret, algorithms=ALGORITHMS, leeway=CLOCK_SKEW_S,
                                options={"verify_aud": False})
        except jwt.ExpiredSignatureError:
            raise _invalid("JWT expired") from None
        except jwt.InvalidAlgorithmError:
            raise _invalid("Wrong or unsupported encoding algorithm") from None
        except jwt.InvalidSignatureError:
            raise _invalid("JWSError JWSInvalidSignature") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("JWT not yet valid") from None
        except jwt.InvalidTokenError as exc:
            raise _invalid(f"Invalid JWT: {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise _invalid("Invalid JWT: malformed claims") from None
        if not isinstance(claims, dict):
            raise _invalid("The JWT claims must be a JSON object")
        try:
            orjson.dumps(claims)
        except (orjson.JSONEncodeError, TypeError):
            raise _invalid("Invalid JWT: a claim holds a number beyond 64 bits") from None
        if self._audience is not None and "aud" in claims:
            audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
            if self._audience not in audiences:
                raise _invalid("JWT not in audience")
        return claims
