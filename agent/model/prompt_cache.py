"""Prompt embeddings kept between jobs, and the seconds each stage of a generation took."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass
class GenerationTimings:
    """Seconds spent in each stage of one generation."""

    text_encoding: float = 0.0
    denoising: float = 0.0
    decoding: float = 0.0
    prompt_cache_hit: bool = False
    marks: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Return the stages as a plain dict."""
        return {
            "text_encoding": self.text_encoding,
            "denoising": self.denoising,
            "decoding": self.decoding,
            "prompt_cache_hit": float(self.prompt_cache_hit),
        }


class PromptCache:
    """A bounded LRU of prompt embeddings, in front of the pipeline's ``encode_prompt``."""

    KEYS = (
        "prompt",
        "prompt_2",
        "negative_prompt",
        "negative_prompt_2",
        "do_classifier_free_guidance",
        "num_images_per_prompt",
        "clip_skip",
        "lora_scale",
    )

    def __init__(self, encode: Callable[..., Any], size: int) -> None:
        """Wrap ``encode`` with a cache of ``size`` entries."""
        self._encode = encode
        # SD 1.x/2.x's pipeline passes its first arguments by position, SDXL's by name: bound
        # to their names, both key the cache alike.
        self._signature = inspect.signature(encode)
        self._size = size
        self._entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.hits = 0
        self.last_hit = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - encode_prompt's own
        """Return cached embeddings for a prompt seen before, else encode and remember them."""
        try:
            named = self._signature.bind(*args, **kwargs).arguments
        except TypeError:
            named = None
        given_embeddings = named is not None and any(
            value is not None for name, value in named.items() if name.endswith("_embeds")
        )
        if named is None or given_embeddings or self._size == 0:
            self.last_hit = False
            return self._encode(*args, **kwargs)
        kwargs = dict(named)
        key = tuple(kwargs.get(name) for name in self.KEYS)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            self.last_hit = True
            return self._entries[key]
        self.last_hit = False
        result = self._encode(**kwargs)
        self._entries[key] = result
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return result

    def clear(self) -> None:
        """Forget every entry (the text encoders changed)."""
        self._entries.clear()
