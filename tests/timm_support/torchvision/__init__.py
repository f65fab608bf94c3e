"""A test-only stand-in for torchvision: exactly the names timm 1.0.x imports at import time.

timm imports torchvision when `import timm` runs (layers, data transforms and datasets), but
the torchvision that pip offers does not load against the local CPU build of torch
("operator torchvision::nms does not exist"), and installing a matching one would pull a
multi-GB CUDA torch. tests/conftest.py puts the folder above this one on sys.path only when
the real torchvision is absent or fails to import. See tests/timm_support/README.md.

Nothing here is part of bspf_ext; nothing outside the tests may import it.
"""

STAND_IN = True  # how a test tells this stand-in from the real torchvision
