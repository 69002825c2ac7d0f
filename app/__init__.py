"""cxr-pneumonia inference service and the model/preprocessing core shared with training."""
