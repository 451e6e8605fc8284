"""Image rows: messages with image parts, split into prompt / completion / images.

A row's images stay raw (a path, base64 text, bytes or a PIL image) until a
micro-batch is collated; :func:`open_image` decodes one then. Accepted image parts
in a message's ``content`` list::

    {"type": "image", "path": "img/0.png"}              # a local file
    {"type": "image", "base64": "iVBORw0..."}           # or a data: URI
    {"type": "image", "image": <PIL image | path | bytes | {"bytes", "path"}>}
    {"type": "image"}                                   # the next entry of the row's
                                                        # ``images`` column

URLs are refused: training must not depend on the network. Relative paths are
read from the working directory, then from the dataset file's folder.

No torch here: the dataset strategy, the collator and the plugin's checks use it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.data.chat_template import is_image_part

_INLINE_KEYS = ("image", "path", "base64", "url", "image_url")


@dataclass
class VisionRow:
    """One conversation: the prompt (image parts as ``{"type": "image"}``), the
    off-policy completion text (None for a prompt-only row) and the raw images in
    the order their parts appear."""

    prompt_messages: list[dict]
    completion: str | None
    images: list = field(default_factory=list)


def _inline_image(part: dict):
    for key in _INLINE_KEYS:
        value = part.get(key)
        if value is not None:
            return {"base64": value} if key == "base64" else value
    return None


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")


def split_vision_row(
    messages: list[dict], column_images, index: int, images_field: str = "images"
) -> VisionRow:
    """Normalize image parts and collect the row's images in order.

    ``messages`` are role-normalized (see ``chat_template.normalize_messages``);
    ``column_images`` is the row's ``images`` column (or None). Raises
    :class:`GoldConfigError` naming the row when placeholders and images disagree.
    """
    column = list(column_images or [])
    images, placeholders, out = [], 0, []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(dict(message))
            continue
        parts = []
        for part in content:
            if is_image_part(part):
                inline = _inline_image(part)
                if inline is None:
                    placeholders += 1
                    if placeholders > len(column):
                        raise GoldConfigError(
                            f"dataset row {index} has more image placeholders "
                            f"(`{{\"type\": \"image\"}}` parts without data) than images in its "
                            f"`{images_field}` column ({len(column)}): add the images, or put "
                            "each image in its part (`path`, `base64` or `image`)."
                        )
                    inline = column[placeholders - 1]
                images.append(inline)
                parts.append({"type": "image"})
            elif isinstance(part, dict):
                parts.append({"type": "text", "text": part.get("text") or ""})
            else:
                parts.append({"type": "text", "text": str(part)})
        out.append({**message, "content": parts})
    if placeholders < len(column):
        raise GoldConfigError(
            f"dataset row {index} has {len(column)} images in its `{images_field}` column but "
            f"only {placeholders} image placeholders in its messages: add a "
            "`{\"type\": \"image\"}` part where each image belongs."
        )
    if out and out[-1].get("role") == "assistant":
        if any(is_image_part(p) for p in out[-1]["content"] if isinstance(out[-1]["content"], list)):
            raise GoldConfigError(
                f"dataset row {index}: the last assistant turn (the completion) holds an image; "
                "completions are text: move the image to a user turn."
            )
        return VisionRow(out[:-1], _text_of(out[-1]["content"]), images)
    return VisionRow(out, None, images)


def resolve_path(path: str, base_dirs: tuple[str, ...] = ()) -> str | None:
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    for base in ("", *base_dirs):
        candidate = os.path.join(base, path) if base else path
        if os.path.exists(candidate):
            return candidate
    return None


def _decode_base64(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise GoldConfigError(f"{where}: the base64 image data cannot be decoded ({err}).") from err


def _source(spec, where: str, base_dirs: tuple[str, ...]):
    """A file path or an in-memory file for ``spec`` (PIL images are returned as is)."""
    if isinstance(spec, dict) and ("bytes" in spec or "path" in spec) and "base64" not in spec:
        if spec.get("bytes"):
            return io.BytesIO(spec["bytes"])
        spec = spec.get("path")
    if isinstance(spec, dict) and "base64" in spec:
        return io.BytesIO(_decode_base64(spec["base64"], where))
    if isinstance(spec, (bytes, bytearray)):
        return io.BytesIO(bytes(spec))
    if isinstance(spec, str):
        if spec.startswith("data:"):
            return io.BytesIO(_decode_base64(spec, where))
        if spec.startswith(("http://", "https://")):
            raise GoldConfigError(
                f"{where}: image `{spec[:80]}` is a URL; axolotl-gold reads images from local "
                "files or base64 only (training must not depend on the network): download it "
                "and use `path`."
            )
        path = resolve_path(spec, base_dirs)
        if path is None:
            raise GoldConfigError(
                f"{where}: image path `{spec}` does not exist (looked in the working "
                "directory and beside the dataset file): fix the path in the row."
            )
        return path
    return spec  # a PIL image (or something PIL will reject below)


def open_image(spec, where: str = "an image", base_dirs: tuple[str, ...] = (), load: bool = True):
    """Decode ``spec`` to an RGB PIL image (``load=False``: read the header only)."""
    from PIL import Image, UnidentifiedImageError

    source = _source(spec, where, base_dirs)
    if isinstance(source, Image.Image):
        return source.convert("RGB") if load else source
    try:
        image = Image.open(source)
        if load:
            image.load()
            return image.convert("RGB")
        return image
    except (UnidentifiedImageError, OSError, ValueError, AttributeError) as err:
        raise GoldConfigError(f"{where}: the image cannot be decoded ({type(err).__name__}: {err}).") from err
