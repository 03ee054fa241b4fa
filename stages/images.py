"""Image decoding shared by the stages: every failure is a Reject with a reason a person can act on."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from stages.base import Reject

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is rejected, not silently grey-filled
Image.MAX_IMAGE_PIXELS = 200_000_000  # decompression-bomb guard (PIL raises beyond 2x this)


def read_bytes(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise Reject(f"missing image file {path}")
    data = p.read_bytes()
    if not data:
        raise Reject(f"empty image file {path}")
    return data


def decode_rgb(data: bytes, max_side: int | None = None) -> tuple[Image.Image, float]:
    """Decode to RGB (grayscale, CMYK, palette, alpha handled), downscaled so the longer side <= max_side.

    Returns the image and the scale factor applied (1.0 when not downscaled), so boxes can follow.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise Reject("not a decodable image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Reject(f"corrupt image ({e})") from None
    except Image.DecompressionBombError as e:
        raise Reject(f"image too large ({e})") from None
    if img.width < 1 or img.height < 1:
        raise Reject(f"zero-size image {img.width}x{img.height}")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        img = bg
    elif img.mode != "RGB":
        img = img.convert("RGB")  # L, I;16, CMYK, P, YCbCr ...
    scale = 1.0
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    return img, scale


def to_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_array(data: bytes) -> np.ndarray:
    """HxWx3 uint8 of an already-normalised JPEG (the `image` column after ingest)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
