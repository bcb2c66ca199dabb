"""atlasgen: build a static feature atlas of a vision model (DINOv3 + a sparse autoencoder)."""

__version__ = "0.1.0"
