"""Seed blueprints: the registry (:mod:`.base`) and one module per host family.

Importing the package registers every blueprint, CNN first, then language-model: that order is
the catalogue a learned controller is laid out over (checkpoints depend on it).
"""

from esper.kasmina.blueprints import cnn, lm  # noqa: F401  (register, in catalogue order)
from esper.kasmina.blueprints.base import (
    BLUEPRINTS,
    Blueprint,
    Params,
    blueprint_catalogue,
    catalogue_index,
    family_blueprints,
    get_blueprints,
    register_blueprint,
)

__all__ = [
    "BLUEPRINTS",
    "Blueprint",
    "Params",
    "blueprint_catalogue",
    "catalogue_index",
    "family_blueprints",
    "get_blueprints",
    "register_blueprint",
]
