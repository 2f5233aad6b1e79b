"""Errors a user can cause; the CLI prints each as one line and exits non-zero."""


class AwencError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ConfigError(AwencError, ValueError):
    """Unknown config key, wrong type, or an inconsistent value."""


class ArtifactError(AwencError, ValueError):
    """A model, checkpoint or secret file that is missing, corrupt or of the wrong kind."""


class TamperedSecretError(ArtifactError):
    """A secret file whose content no longer matches its recorded SHA-256."""
