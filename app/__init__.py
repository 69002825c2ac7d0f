"""cxr-pneumonia inference service and the model/preprocessing core shared with training."""

SERVICE_NAME = "cxr-pneumonia"
__version__ = "0.1.0"
