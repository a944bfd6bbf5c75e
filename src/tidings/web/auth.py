"""The action token: who may change things through the console.

Actions (``POST`` endpoints) need ``Authorization: Bearer TOKEN`` matching the token the console
was started with. Without a configured token every action answers 403 (the console is read-only);
with one, a missing or wrong token answers 401.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tidings.web.app import console_of
from tidings.web.schemas import ErrorOut

__all__ = ["ACTION_RESPONSES", "require_token"]

bearer = HTTPBearer(auto_error=False, description="The token given to 'tidings serve --token'.")

ACTION_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "No token, or the wrong one."},
    403: {"model": ErrorOut, "description": "Actions are disabled: the console has no token."},
}


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Refuse the request unless it carries the console's token (see the module docstring)."""
    console = console_of(request)
    if not console.actions_enabled:
        raise HTTPException(
            403, "actions are disabled: start 'tidings serve' with --token (or TIDINGS_CONSOLE_TOKEN)"
        )
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "this action needs 'Authorization: Bearer TOKEN'", headers={"WWW-Authenticate": "Bearer"}
        )
    if not console.token_matches(credentials.credentials):
        raise HTTPException(401, "wrong token", headers={"WWW-Authenticate": "Bearer"})
