"""Typed errors raised at the layer boundaries.

The server's one error middleware maps each class to an OpenAI-shaped JSON error with the
status code below; the daemon maps `ConfigError` to exit status 78 (EX_CONFIG).
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base class. `http_status` and `error_type` are what the HTTP layer sends."""

    http_status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ConfigError(ApplianceError):
    """A config file or flag is wrong. The message names the file, the key and what is expected."""

    error_type = "config_error"


class InvalidRequestError(ApplianceError):
    """The request itself is wrong (bad parameter, prompt longer than max_model_len, …)."""

    http_status = 400
    error_type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    pass


class ModelLoadError(ApplianceError):
    """The model cannot be loaded: unknown path, corrupt or unsupported file."""

    error_type = "model_load_error"


class ModelNotFoundError(ModelLoadError):
    http_status = 404
    error_type = "not_found_error"


class EngineDeadError(ApplianceError):
    """The engine loop failed; every in-flight request fails with this and the daemon exits."""

    error_type = "engine_error"


class EngineOverloadedError(ApplianceError):
    """The admission queue is full."""

    http_status = 429
    error_type = "rate_limit_error"


class EngineUnavailableError(ApplianceError):
    """Loading or draining."""

    http_status = 503
    error_type = "service_unavailable"
