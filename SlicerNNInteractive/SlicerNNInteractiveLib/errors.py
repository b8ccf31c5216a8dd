"""Typed errors of the client, each with a message a user can act on."""


class NNInteractiveError(RuntimeError):
    """Base class: ``str(err)`` is a sentence meant for the user."""


class ServerUnreachableError(NNInteractiveError):
    """No TCP connection (server down, wrong host or port, firewall, proxy)."""


class ServerCertificateError(NNInteractiveError):
    """An https connection failed its TLS check: the server's certificate is not trusted (a private certificate
    authority the client was not given), does not name the host in the URL, or has expired; or the CA bundle given
    cannot be read. Not a transient failure: retrying does not help."""


class NotAServerError(NNInteractiveError):
    """Something answered, but not an nnInteractive server (a proxy page, another web app, a wrong path)."""


class UnauthorizedError(NNInteractiveError):
    """HTTP 401: the API key is missing or wrong."""


class SessionExpiredError(NNInteractiveError):
    """HTTP 410: the lease is unknown (idle or liveness timeout, server restart, another server behind a balancer)."""


class BackendLostError(SessionExpiredError, ServerUnreachableError):
    """The server holding the session stopped answering in the middle of it: a request of the session had its
    connection refused, dropped or reset, or a load balancer in front answered 502 / 503 / 504 for it (the server
    behind died or restarted). Handled like an expired session (``SyncedSession`` claims a new one, which a balancer
    sends to a live server, sends the image and segment again and repeats the action once). Whether the lost request
    was applied is unknown, so the old session is never used again."""


class ServerAtCapacityError(NNInteractiveError):
    """HTTP 503 on claim: every session slot is taken."""

    def __init__(self, message, retry_after=None):
        NNInteractiveError.__init__(self, message)
        self.retry_after = retry_after


class BadRequestError(NNInteractiveError):
    """HTTP 4xx other than the above: the server refused the input and said why."""

    def __init__(self, message, status_code=400):
        NNInteractiveError.__init__(self, message)
        self.status_code = status_code


class ServerTimeoutError(NNInteractiveError):
    """The server did not answer within the configured time."""


class ServerError(NNInteractiveError):
    """HTTP 5xx other than capacity: a fault on the server side."""


class SessionClosedError(NNInteractiveError):
    """The connection was closed by its owner; nothing more is sent (no new session is claimed)."""


class IncompatibleServerError(NNInteractiveError):
    """The server answered, but speaks another version of nnInteractive's protocol than this client: the message says
    which side to update."""
