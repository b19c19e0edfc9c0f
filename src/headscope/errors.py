"""Every error a user can cause or meet, in one hierarchy.

Each class carries the HTTP status the server answers with and the exit code the CLI ends with;
the server (``server/app.py``) and the CLI (``cli.py``) each map :class:`HeadscopeError` in one
place, so an expected condition reaches a user as one line, never as a traceback.

============================  ======  ====  ====================================================
class                         HTTP    exit  when
============================  ======  ====  ====================================================
:class:`InputError`           422     2     a request or argument that cannot be answered as given
:class:`DataError`            422     2     a file or dataset that is malformed, empty or too small
:class:`NotFound`             404     2     a run, file, head or feature that does not exist
:class:`AlreadyExists`        409     2     an output that would overwrite something else
:class:`ModelUnavailable`     503     3     a model that cannot be loaded here (offline hub id, ...)
:class:`NoModel`              503     3     a live analysis on a server started without a model
:class:`Busy`                 503     3     the model queue is full (retry)
============================  ======  ====  ====================================================
"""

from __future__ import annotations


class HeadscopeError(Exception):
    """An expected failure with a message a user can act on."""

    status: int = 500
    exit_code: int = 1


class InputError(HeadscopeError, ValueError):
    """A request that cannot be answered as given (bad head, position, text, option, ...)."""

    status, exit_code = 422, 2


class DataError(HeadscopeError, ValueError):
    """A file or dataset that is malformed, empty or too small for what was asked."""

    status, exit_code = 422, 2


class NotFound(HeadscopeError, FileNotFoundError):
    """A run, file, head or feature that does not exist."""

    status, exit_code = 404, 2


class AlreadyExists(HeadscopeError, FileExistsError):
    """An output path that holds something this command must not overwrite."""

    status, exit_code = 409, 2


class ModelUnavailable(HeadscopeError):
    """A model that cannot be loaded here: a hub id with no network, missing files, ..."""

    status, exit_code = 503, 3


class NoModel(HeadscopeError):
    """A live analysis was asked of a server started without a model."""

    status, exit_code = 503, 3


class Busy(HeadscopeError):
    """The model queue is full; the request may be retried."""

    status, exit_code = 503, 3
