"""The names the command line accepts, importable without JAX.

``bdjax --help`` and a mistyped argument answer before JAX is imported (a second or more),
so the parser's choices cannot come from the registries themselves. Each tuple here must
equal its registry (``tests/test_cli.py`` checks): models ``bdjax.models.MODEL_NAMES``,
attacks ``bdjax.attacks.ATTACKS``, recipes ``bdjax.recipes.RECIPES``, defenses
``bdjax.defenses.DEFENSES`` (whose registrations carry each method's summary, paper and kind).
"""

DATASET_NAMES = ("gtsrb", "cifar10", "cifar100")
MODEL_NAMES = ("resnet20", "resnet32", "resnet56", "resnet18", "preact-resnet18", "preact-resnet18-backdoorbench",
               "vgg11-bn", "vgg16-bn", "mobilenet-v2", "mobilenet-v2-torchvision", "small", "small-bn", "medium",
               "medium-bn", "large", "large-bn")
ATTACK_NAMES = ("badnets", "blended", "cb", "input-aware", "lf", "multi-patch", "random-size-patch", "sig", "sp",
                "ssba", "trojan", "wanet")
RECIPE_NAMES = ("backdoorbench", "default", "thesis")
DEFENSE_NAMES = ("abs", "anp", "bna", "cetf", "cetf+bn-clean", "cetf+bn-unlearn", "cetf+unlearn", "clp", "fp",
                 "februus", "ft", "ibau", "nad", "nc", "neo", "rnp", "strip", "suspicion", "tac", "tsbd")
