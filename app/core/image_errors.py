"""Why an upload cannot be turned into model input: one ``ImageError`` subclass per stable code.

A leaf module so that every decoder (``preprocessing``, ``dicom``) raises the same classes
without importing each other. The HTTP status of each code is in ``app.api.errors.ERRORS``.
"""

from __future__ import annotations

from app.core.coded_error import CodedError


class ImageError(CodedError):
    """An upload that cannot be turned into model input; ``code`` is stable for clients."""

    code = "invalid_image"
    default_message = "the upload cannot be used as an image"


class EmptyImageError(ImageError):
    code = "empty_file"
    default_message = "the uploaded file is empty"


class UnreadableFileError(ImageError):
    """A file on disk (offline scoring, training data) that could not be read at all."""

    code = "read_error"


class UnsupportedImageError(ImageError):
    code = "unsupported_media_type"


class CorruptImageError(ImageError):
    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class UnsuitableShapeError(ImageError):
    """An image too small for the model's input, or of a shape no chest film has: refused, not squashed."""

    code = "unsuitable_shape"
