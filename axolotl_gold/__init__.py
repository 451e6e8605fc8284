"""axolotl-gold: on-policy logit distillation (GOLD) as an Axolotl plugin.

Layers, each depending only on the ones above it:

1. ``losses`` and ``alignment``: pure torch, no axolotl import.
2. ``engines`` (rollout generation) and ``buffer`` (the optimizer window).
3. ``trainer``: orchestrates one GOLD step.
4. ``plugin``, ``args``, ``chat_template``: the Axolotl glue.

Importing this package is cheap: the plugin class is resolved lazily so that an
``axolotl.plugins`` entry point costs nothing until GOLD is switched on.
"""

__version__ = "0.1.0"

__all__ = ["GoldPlugin", "__version__"]


def __getattr__(name):
    if name == "GoldPlugin":
        from axolotl_gold.plugin import GoldPlugin

        return GoldPlugin
    raise AttributeError(f"module 'axolotl_gold' has no attribute {name!r}")
