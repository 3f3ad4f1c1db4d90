"""The one error tree: every error a user can cause is a `SimsearchError`, and its class alone decides
the CLI's exit code and the server's HTTP status (`exit_code`, `http_status`; never the message text).

    SimsearchError                      exit 1, HTTP 400
    ├── BadInput (also a ValueError)    exit 1, HTTP 422   a value, file or option the user gave is wrong
    │   ├── ImageError                                     an image that cannot be read or decoded
    │   │   └── ImageTooLarge                     HTTP 413 over the pixel limit
    │   ├── BackboneError                                  a backbone or weights file that cannot be used
    │   └── HeadError                                      a fine-tuned head file that cannot be used
    ├── EmbedderMismatch                HTTP 409           options or files of another embedder than the index's
    ├── IndexNotReady                   HTTP 409           the index's state does not allow it yet (empty bank,
    │                                                      nothing to calibrate on)
    ├── IndexBusy                       exit 4, HTTP 409   another writer holds the index's lock
    ├── IndexMissing                    HTTP 503           no index in that folder
    ├── IndexDamaged                    exit 3, HTTP 503   files missing, unreadable or disagreeing: repair it
    │   └── CatalogError                                   meta.sqlite unusable, or from a newer simsearch
    ├── UnknownIndex                    HTTP 404           (server) no index of that name is served
    ├── IndexUnavailable                HTTP 503           (server) a served index cannot answer now
    └── RequestRefused                  its own status     (server) refused at the HTTP layer (auth, limits)

An exception that is not a SimsearchError is a bug: the CLI shows its traceback, the server answers 500.
"""
from __future__ import annotations


class SimsearchError(Exception):
    """An error a user can act on; the message says what to do."""


class BadInput(SimsearchError, ValueError):
    """A value, file or option given by the user is wrong. Also a ValueError, as argument checks are."""


class ImageError(BadInput):
    """An input that is not a usable image; the message names the file and the reason.

    The message is kept to one printable line: control characters (a newline in a file name, say)
    are written as escapes.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


class ImageTooLarge(ImageError):
    """An image over the pixel limit, refused before it is decoded."""


class BackboneError(BadInput):
    """A backbone, or a weights file, that cannot be built or loaded."""


class HeadError(BadInput):
    """A head file that cannot be used (unreadable, not a head, or made for another embedder)."""


class EmbedderMismatch(SimsearchError):
    """Options or files that name another embedder than the index's own."""


class IndexNotReady(SimsearchError):
    """The index's state does not allow the request yet: no reference images, nothing to calibrate on."""


class IndexBusy(SimsearchError):
    """Another writer held the index's lock for longer than SIMSEARCH_LOCK_TIMEOUT."""


class IndexMissing(SimsearchError):
    """No index in the folder named."""


class IndexDamaged(SimsearchError):
    """The index's files are missing, unreadable or disagree: it answers nothing until repaired."""


class CatalogError(IndexDamaged):
    """meta.sqlite cannot be used: damaged, not a simsearch catalog, or from a newer simsearch."""


class UnknownIndex(SimsearchError):
    """The server serves no index of that name."""


class IndexUnavailable(SimsearchError):
    """A served index is configured but cannot answer now (not built yet, or damaged)."""


class RequestRefused(SimsearchError):
    """Refused at the HTTP layer (authentication, request limits, a missing resource): carries its status."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# (exit code, HTTP status) by class; the most specific class listed in an error's MRO wins.
OUTCOMES: dict[type, tuple[int, int]] = {
    SimsearchError: (1, 400),
    BadInput: (1, 422),
    ImageTooLarge: (1, 413),
    EmbedderMismatch: (1, 409),
    IndexNotReady: (1, 409),
    IndexBusy: (4, 409),
    IndexMissing: (1, 503),
    IndexDamaged: (3, 503),
    UnknownIndex: (1, 404),
    IndexUnavailable: (3, 503),
}


def _outcome(exc: SimsearchError) -> tuple[int, int]:
    for cls in type(exc).__mro__:
        if cls in OUTCOMES:
            return OUTCOMES[cls]
    raise TypeError(f"{type(exc).__name__} is not a SimsearchError")


def exit_code(exc: SimsearchError) -> int:
    """The CLI's exit code for `exc` (2 stays typer's, for usage errors)."""
    return _outcome(exc)[0]


def http_status(exc: SimsearchError) -> int:
    """The server's HTTP status for `exc`."""
    if isinstance(exc, RequestRefused):
        return exc.status
    return _outcome(exc)[1]
