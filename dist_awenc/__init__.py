"""dist_awenc: adversarial watermarking (AWEncoder) of contrastive image encoders."""

__version__ = "0.1.0"
