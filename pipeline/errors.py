"""Exceptions whose messages are written for the person using the app (UI and API alike)."""

from __future__ import annotations


class UserFacingError(Exception):
    """Base class: the message is safe and useful to show as is."""


class InputError(UserFacingError, ValueError):
    """The request itself is unusable (bad image, empty prompt, out-of-range number, ...)."""


class ComponentUnavailable(UserFacingError, RuntimeError):
    """A model or the catalog could not be loaded; the rest of the app keeps working."""

    def __init__(self, component: str, reason: str):
        super().__init__(f"The {component} is unavailable: {reason}")
        self.component = component
        self.reason = reason


class ComponentLoading(UserFacingError, RuntimeError):
    """A model is still loading in the background."""

    def __init__(self, component: str):
        super().__init__(f"The {component} is still loading; try again in a few seconds.")
        self.component = component


class Cancelled(UserFacingError):
    """The user stopped the request."""

    def __init__(self, message: str = "Generation stopped."):
        super().__init__(message)


class IndexIntegrityError(UserFacingError, RuntimeError):
    """A shipped index file does not match its manifest (tampered, truncated or from another build)."""
