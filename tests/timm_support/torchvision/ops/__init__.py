"""Stand-in for torchvision.ops: only the `misc` submodule."""
