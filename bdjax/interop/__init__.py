"""Models from other frameworks in and out of bdjax runs (``bdjax.interop.torch``: PyTorch).

Nothing here imports a framework at import time: PyTorch is loaded by the functions that read
or write its files, so ``bdjax`` works without it (``pip install 'bdjax[torch]'`` adds it).
"""

# The bdjax models with a PyTorch layout in ``bdjax.interop.torch`` (the CLI's choices, JAX-free).
TORCH_MODELS = ("preact-resnet18", "preact-resnet18-backdoorbench", "resnet18", "resnet20", "vgg11-bn", "vgg16-bn",
                "mobilenet-v2-torchvision")
