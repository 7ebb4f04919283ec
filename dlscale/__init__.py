"""dlscale: foundation-style encoders for strong-lensing substructure images, trained at scale."""
__all__ = ["load_encoder"]
__version__ = "0.3.0"


def __getattr__(name: str):
    # Lazy: `import dlscale.data...` in reader processes and DataLoader workers must not pull in torchvision.
    if name == "load_encoder":
        from dlscale.export import load_encoder
        return load_encoder
    raise AttributeError(f"module 'dlscale' has no attribute {name!r}")
