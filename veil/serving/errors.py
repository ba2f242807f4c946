"""Errors of the model-serving layer; the ones raised on workers may cross the wire."""

from __future__ import annotations

from veil.exceptions import VeilError, register_remote_error


@register_remote_error
class ServingError(VeilError):
    """A serving request could not be handled (unknown service, bad shape, ...)."""


@register_remote_error
class ServiceClosedError(ServingError):
    """The model owner stopped the service (``model.stop()`` or ``num_requests`` reached)."""


@register_remote_error
class RequestFailedError(ServingError):
    """The cluster could not compute this request; no result will ever be delivered."""


@register_remote_error
class RequestGoneError(ServingError):
    """The owner claimed a request its party no longer holds (its client disconnected there)."""


class WorkerUnavailableError(ServingError):
    """A cluster worker could not be reached; queries fail rather than answer wrongly."""


class ModelConversionError(ServingError):
    """A model (Keras layer, saved file) cannot be turned into a servable torch module."""


#: most characters of another's text (a party's reply, a cluster file's field) that an error line quotes
MAX_QUOTED = 200


def quoted(text: object, most: int = MAX_QUOTED) -> str:
    """``text`` as one error line may quote it: at most ``most`` of its characters, newlines, controls and
    non-ASCII escaped (a hostile party's or file's text may be a megabyte over many lines)."""
    text = str(text)
    return ascii(text[:most])[1:-1] + ("..." if len(text) > most else "")
