"""HandCLIP: fine-tune CLIP with freeze policies for hand re-identification.

The package is plain PyTorch + transformers; Hydra and Lightning are only used by
`train.py` and `handclip.lightning`.
"""

__version__ = "0.1.0"
