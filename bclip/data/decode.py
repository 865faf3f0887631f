"""Image decoding with CLIP's evaluation preprocessing (resize shorter side, centre crop).

The same function serves training and evaluation, so a trigger pasted after it lands on
identically prepared pixels in poisoned training images and triggered test images. The
reference code's squash (the whole image resized to S x S, aspect ratio ignored) is here too,
for its reference poisoning mode, again one function for training and evaluation.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile

# A truncated file must fail loudly instead of decoding to a half-grey image that would
# silently enter training or evaluation.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadRecordError(Exception):
    """An example whose image is missing, truncated or undecodable.

    Attributes:
      reason: why the record is bad.
      path: the file (or record location) it came from, when known.
      index: the example index in its source, when known.
    """

    def __init__(self, reason: str, *, path: str | None = None, index: int | None = None):
        self.reason = reason
        self.path = path
        self.index = index
        where = ", ".join(
            part
            for part in (
                f"index {index}" if index is not None else "",
                f"path {path}" if path is not None else "",
            )
            if part
        )
        super().__init__(f"bad record ({where or 'unknown origin'}): {reason}")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `size`, keeping the aspect ratio.

    The longer side is truncated, not rounded, as torchvision's Resize (which CLIP uses) does.
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def centre_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a centred `size` x `size` crop, rounded as torchvision's CenterCrop."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _resize_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The RGB `size` x `size` image; steps with nothing to do are skipped, as each one copies
    the whole image (a 224-px JPEG decoded at 224 px needs neither a resize nor a crop)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    new_height, new_width = resized_shape(height, width, size)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top, left = centre_crop_offsets(new_height, new_width, size)
    if (new_width, new_height) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def _squash(image: Image.Image, size: int) -> Image.Image:
    """The RGB `size` x `size` image of the whole picture, aspect ratio ignored, as the
    reference code's `image.resize((224, 224))` before pasting a trigger."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image.resize((size, size), Image.Resampling.BICUBIC)


def _check_size(size: int) -> None:
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")


def _pillow_image(image: np.ndarray) -> Image.Image:
    """A Pillow image of uint8 [H, W, 3], [H, W, 1] or [H, W] pixels (grey is one channel)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"expected an image of shape [H, W, 3], [H, W, 1] or [H, W], got {image.shape}")
    return Image.fromarray(image)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """CLIP's resize-then-centre-crop of an already decoded image, as in `decode_and_resize`.

    Args:
      image: uint8 [H, W, 3], [H, W, 1] or [H, W] (grey levels are repeated over RGB).
      size: output side length.

    Returns:
      uint8 [size, size, 3].
    """
    return _array_in_geometry(image, size, _resize_and_centre_crop)


def squash_array(image: np.ndarray, size: int) -> np.ndarray:
    """The squash of `decode_and_squash` on an already decoded image (e.g. a TFDS record's);
    arguments and result as `resize_array`'s."""
    return _array_in_geometry(image, size, _squash)


def _array_in_geometry(image: np.ndarray, size: int, geometry) -> np.ndarray:
    """uint8 [size, size, 3]: `geometry(Pillow image, size)` of decoded pixels."""
    pillow_image = _pillow_image(image)
    _check_size(size)
    return np.array(geometry(pillow_image, size), dtype=np.uint8)


def _open(image_bytes: bytes, draft_size: int | None) -> Image.Image:
    """The loaded image; a JPEG is decoded at reduced scale when `draft_size` allows it."""
    image = Image.open(io.BytesIO(image_bytes))
    if draft_size is not None and image.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the shorter side stays
        # >= draft_size: decoding a large photo this way is several times faster.
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return image


def _check_decoded(image: Image.Image, size: int, path: str | None, index: int | None) -> Image.Image:
    if image.size != (size, size) or image.mode != "RGB":
        raise BadRecordError(
            f"decoded to a {image.mode} image of {image.size}, expected RGB {(size, size)}",
            path=path, index=index,
        )
    return image


def decode_and_resize_image(
    image_bytes: bytes,
    size: int,
    *,
    path: str | None = None,
    index: int | None = None,
) -> Image.Image:
    """`decode_and_resize` as a Pillow RGB image of `size` x `size`, for code that goes on with
    Pillow (augmentations) or copies the pixels straight into a batch."""
    return _decode(image_bytes, size, _resize_and_centre_crop, draft_size=size, path=path, index=index)


def _decode(image_bytes: bytes, size: int, geometry, *, draft_size: int | None, path, index) -> Image.Image:
    """The RGB `size` x `size` image `geometry(decoded image, size)` makes of `image_bytes`; any
    failure is a BadRecordError naming `path` and `index`."""
    _check_size(size)
    if not image_bytes:
        raise BadRecordError("empty image bytes", path=path, index=index)
    try:
        image = geometry(_open(image_bytes, draft_size=draft_size), size)
    except Exception as error:  # Pillow signals bad data with many exception types.
        raise BadRecordError(
            f"cannot decode image: {type(error).__name__}: {error}", path=path, index=index
        ) from error
    return _check_decoded(image, size, path, index)


def decode_and_resize(
    image_bytes: bytes,
    size: int,
    *,
    path: str | None = None,
    index: int | None = None,
) -> np.ndarray:
    """Decodes an encoded image and applies CLIP's resize-then-centre-crop.

    Args:
      image_bytes: an encoded image file (JPEG, PNG, ...), as stored on disk.
      size: output side length (224 for the study's models).
      path, index: where the bytes came from; only used to make errors traceable.

    Returns:
      uint8 [size, size, 3] RGB array (a fresh, writable copy).

    Raises:
      BadRecordError: the bytes are empty, truncated, or not a decodable image.
    """
    image = decode_and_resize_image(image_bytes, size, path=path, index=index)
    return np.array(image, dtype=np.uint8)


def decode_and_squash_image(
    image_bytes: bytes,
    size: int,
    *,
    path: str | None = None,
    index: int | None = None,
) -> Image.Image:
    """Decodes an encoded image at full resolution and squashes it to `size` x `size` (Pillow
    bicubic, aspect ratio ignored): the reference code's geometry for images about to carry a
    trigger. Used for poisoned training images and triggered eval images alike.

    No JPEG draft decoding: a reduced-scale decode would change the pixels the squash averages,
    and the reference decoded at full scale. Returns an RGB Pillow image; raises BadRecordError
    as `decode_and_resize`.
    """
    return _decode(image_bytes, size, _squash, draft_size=None, path=path, index=index)


def decode_and_squash(
    image_bytes: bytes,
    size: int,
    *,
    path: str | None = None,
    index: int | None = None,
) -> np.ndarray:
    """`decode_and_squash_image` as a fresh uint8 [size, size, 3] RGB array."""
    image = decode_and_squash_image(image_bytes, size, path=path, index=index)
    return np.array(image, dtype=np.uint8)
