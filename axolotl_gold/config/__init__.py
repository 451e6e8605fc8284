"""Configuration: the YAML keys (``schema``), their checks before any model loads
(``validation``), and the one settings object the run is built from (``settings``)."""

from axolotl_gold.config.errors import GoldConfigError

__all__ = ["GoldConfigError"]
