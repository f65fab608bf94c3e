"""What the stand-in's placeholders raise when timm reaches past its imports."""


def missing(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{name} is not provided by the test stand-in for torchvision (tests/timm_support): "
        "it only lets timm import and build models; install a torchvision that loads against "
        "this torch for data pipelines"
    )


def placeholder(module: str, name: str) -> type:
    """A class timm can import (and subclass) that refuses to be instantiated."""

    def __init__(self, *args, **kwargs):
        raise missing(f"{module}.{name}")

    return type(name, (), {"__init__": __init__, "__module__": module, "__doc__": f"Stand-in for {module}.{name}."})


def module_getattr(module: str):
    """A module-level __getattr__: any other name is missing (a `from ... import` of it is an ImportError)."""

    def __getattr__(name: str):
        raise AttributeError(f"module {module!r} (test stand-in for torchvision) has no attribute {name!r}")

    return __getattr__
