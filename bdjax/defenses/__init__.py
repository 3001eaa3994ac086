"""Defenses, each a pure function registered by name (``bdjax defend NAME``)."""

from bdjax.defenses import finetune  # noqa: F401  (registers "ft")
from bdjax.defenses import bn_repair, cetf  # noqa: F401  (registers "cetf", "cetf+bn-clean", ...)
from bdjax.defenses import clp  # noqa: F401  (registers "clp")
from bdjax.defenses import februus, neo, strip  # noqa: F401  (registers "februus", "neo", "strip": input filters)
from bdjax.defenses import suspicion  # noqa: F401  (registers "suspicion")
from bdjax.defenses import anp, nad  # noqa: F401  (registers "anp", "nad")
from bdjax.defenses import abs_candidates, tac  # noqa: F401  (registers "tac", "abs")
from bdjax.defenses import fine_pruning, rnp, tsbd  # noqa: F401  (registers "fp", "rnp", "tsbd")
from bdjax.defenses import bna, ibau, neural_cleanse  # noqa: F401  (registers "bna", "ibau", "nc")
from bdjax.defenses.base import (BATCHED, DEFENSES, DefenseResult, DefenseSpec, get, make_config, register,
                                 register_batched)

__all__ = ["BATCHED", "DEFENSES", "DefenseResult", "DefenseSpec", "get", "make_config", "register",
           "register_batched"]
