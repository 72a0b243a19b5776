"""The service edge's one way of turning an exception into a gRPC status on a Serve context.

Project errors carry their status through `services.common.errors.status_for`: a refusal
(invalid input, capacity, upstream) is logged at INFO with its reason, which goes back to the
caller; anything else is a bug, logged with its traceback, and the caller gets only
"internal error (request …)". Used by every Ray Serve gRPC shim; imports grpc, so pure cores
never import it.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from services.common.errors import status_for


class StatusContext(Protocol):
    """The part of Ray Serve's `RayServegRPCContext` this module uses."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def request_id(self) -> str | None: ...


def set_error_status(
    error: BaseException, grpc_context: StatusContext | None, logger: logging.Logger, what: str
) -> None:
    """Log `error` once and set its status on `grpc_context`; without a context, re-raise it."""
    _, code_name = status_for(error)
    request_id = grpc_context.request_id() if grpc_context is not None else None
    if code_name == "INTERNAL":
        logger.exception("%s request %s failed", what, request_id)
        details = "internal error" + (f" (request {request_id})" if request_id else "")
    else:
        logger.info("%s request %s refused: %s", what, request_id, error)
        details = str(error)
    if grpc_context is None:
        raise error
    grpc_context.set_code(grpc.StatusCode[code_name])
    grpc_context.set_details(details)
