"""The project's exception hierarchy.

Pure cores raise these; the service edge maps them to HTTP and gRPC status codes in one place
(`STATUS_BY_ERROR` below). Knows nothing about Ray, gRPC or HTTP libraries: codes are plain
numbers and names.
"""

from __future__ import annotations


class KimiVLError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInputError(KimiVLError, ValueError):
    """The caller sent something we cannot serve: bad media, over-long prompt, malformed request.

    `param`, when set, says where in the request the problem is (`messages[1].content[0].image`);
    HTTP reports it as OpenAI's `param`, gRPC puts it in front of the details.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidInputError):
    """The prompt can never fit this deployment: it is longer than `limit` (max_model_len) allows.

    A 400 with OpenAI's code `context_length_exceeded`; `param` names the request field (the
    ingress knows which: `messages` or `prompt`)."""

    def __init__(self, message: str, *, limit: int, param: str | None = "messages") -> None:
        super().__init__(message, param=param)
        self.limit = limit

    def __reduce__(self) -> tuple[object, ...]:  # crosses Ray processes with its fields
        return (_context_length_error, (str(self), self.limit, self.param))


def _context_length_error(message: str, limit: int, param: str | None) -> ContextLengthError:
    return ContextLengthError(message, limit=limit, param=param)


class InvalidMediaError(InvalidInputError):
    """A media item that cannot be served: undecodable, of an unsupported kind, empty or too large."""


class NotCachedError(InvalidInputError):
    """Embeddings asked for by cache key are not held (evicted, expired, never written, or their
    encoder replica is gone): the caller encodes the media again."""


class CheckpointError(KimiVLError, ValueError):
    """A checkpoint directory is incomplete or inconsistent (missing/contradictory keys or weights)."""


class UnauthenticatedError(KimiVLError):
    """The caller did not prove who it is (a missing or wrong API key)."""


class CapacityError(KimiVLError):
    """The request is valid but exceeds what this deployment can hold right now (KV blocks, queue).

    `retry_after_s`, when set, is how long the caller should wait before trying again (HTTP's
    Retry-After; gRPC clients get it in the details).
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(KimiVLError):
    """The request's deadline passed before it finished; its work was stopped."""


class UpstreamUnavailableError(KimiVLError):
    """A dependency (another deployment, a cache) could not be reached."""


class InternalError(KimiVLError):
    """A bug: the request was valid and the service should have served it."""


# error class -> (HTTP status, gRPC status code name)
STATUS_BY_ERROR: dict[type[KimiVLError], tuple[int, str]] = {
    InvalidInputError: (400, "INVALID_ARGUMENT"),
    UnauthenticatedError: (401, "UNAUTHENTICATED"),
    CheckpointError: (500, "FAILED_PRECONDITION"),
    CapacityError: (429, "RESOURCE_EXHAUSTED"),
    DeadlineExceededError: (504, "DEADLINE_EXCEEDED"),
    UpstreamUnavailableError: (503, "UNAVAILABLE"),
    InternalError: (500, "INTERNAL"),
}


def status_for(error: BaseException) -> tuple[int, str]:
    """HTTP status and gRPC code name for any exception (unknown ones are internal errors)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]  # type: ignore[index]
    return STATUS_BY_ERROR[InternalError]
