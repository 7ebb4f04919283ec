"""dlscale: foundation-style encoders for strong-lensing substructure images, trained at scale."""
from dlscale.version import __version__

__all__ = ["__version__", "load_encoder"]


def __getattr__(name: str):
    # Lazy: `import dlscale.data...` in reader processes and DataLoader workers must not pull in torchvision.
    if name == "load_encoder":
        from dlscale.export import load_encoder
        return load_encoder
    raise AttributeError(f"module 'dlscale' has no attribute {name!r}")
