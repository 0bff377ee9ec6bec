"""The error a bad configuration raises: its message is one line meant for the user.

Kept apart from ``config.py`` so that ``methods.py``, which ``config.py`` asks about the
method a configuration describes, can raise it too."""


class ConfigError(ValueError):
    """A bad configuration: the message is one line meant for the user."""
