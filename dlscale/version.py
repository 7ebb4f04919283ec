"""The version of dlscale (recorded in exports and manifests; read by setup.cfg)."""
__version__ = "0.3.0"
