"""Retry intent is carried by the exception type, never by the text of a message."""


class NebulaError(Exception):
    """Base of every error Nebula raises on purpose."""


class TemporaryError(NebulaError):
    """The operation may succeed if retried later (network blip, etcd leader change, engine loading)."""


class PermanentError(NebulaError):
    """Retrying cannot help (missing model files, invalid spec); surface it to the operator."""


class ValidationError(PermanentError):
    """Input (config, API body, spec) is invalid. `field` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class ConfigError(ValidationError):
    """A bad config file or environment override; the message already names the source and key."""

    def __str__(self) -> str:
        return self.message
