"""Poisoning attacks. ``make(name, key, image_shape, **kwargs)`` builds one by name.

Registered names: badnets, multi-patch, random-size-patch, trojan (patch.py); blended
(blend.py); sig (sig.py); wanet (warp.py); cb, sp (additive.py); lf (lf.py); ssba (ssba.py:
its encoder is trained beforehand, ``python -m bdjax.attacks.ssba_encoder``); input-aware
(input_aware.py: its trigger generator is trained with the classifier, ``train_input_aware``).
"""

from bdjax.attacks.additive import Chessboard, SinglePixel
from bdjax.attacks.base import (ATTACKS, Attack, PoisonedSet, TargetMap, from_record, make,
                                poison_test_set, poison_training_set)
from bdjax.attacks.blend import Blended
from bdjax.attacks.input_aware import InputAware, InputAwareConfig, train_for_run, train_input_aware
from bdjax.attacks.lf import LF, LFSearchConfig, find_lf_perturbation
from bdjax.attacks.patch import BadNets, MultiPatch, RandomSizePatch, Trojan
from bdjax.attacks.sig import SIG
from bdjax.attacks.ssba import SSBA, SSBAEncoderConfig, train_encoder
from bdjax.attacks.warp import WaNet

# Attacks whose trigger is trained together with the classifier, so no training set can be
# poisoned beforehand: ``runs.train_runs`` hands the training to these functions.
TRAINED_WITH_MODEL = {InputAware.name: train_for_run}

__all__ = [
    "ATTACKS", "Attack", "BadNets", "Blended", "Chessboard", "InputAware", "InputAwareConfig", "LF",
    "LFSearchConfig", "MultiPatch", "PoisonedSet", "RandomSizePatch", "SIG", "SSBA", "SSBAEncoderConfig",
    "SinglePixel", "TRAINED_WITH_MODEL", "TargetMap", "Trojan", "WaNet", "find_lf_perturbation", "from_record",
    "make", "poison_test_set", "poison_training_set", "train_encoder", "train_input_aware",
]
