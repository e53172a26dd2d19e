"""negalign: align language models without preference labels (Self-Contrast, Sr-DPO/IPO, SELM, D2O)."""

__version__ = "0.1.0"
