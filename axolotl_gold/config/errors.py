"""The one error type of a GOLD configuration."""


class GoldConfigError(ValueError):
    """A GOLD configuration error; the message names the key to change."""
