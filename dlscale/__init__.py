"""dlscale: foundation-style encoders for strong-lensing substructure images, trained at scale."""
from dlscale.export import load_encoder

__all__ = ["load_encoder"]
__version__ = "0.1.0"
