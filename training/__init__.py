"""Offline training, calibration, evaluation and export of the VGG16 pneumonia classifier."""
