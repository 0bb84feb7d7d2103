"""The diffusers pipeline: loading, device and precision, the speed levers, one generation.

Only the worker process imports this module, so only the worker imports torch. The levers
(each a setting, each measured by ``tests/bench/pipeline.py``): a tiny decoder (TAESDXL) instead
of the full VAE, bfloat16 where the CPU computes it natively, channels_last, half-precision weight
storage where memory is short, a warm-up at load, and a prompt-embedding cache.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderTiny, AutoPipelineForText2Image

from agent.weights import place_weights
from agent.worker import PipelineOptions  # noqa: TC001 - read at run time

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL.Image import Image

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features that make bfloat16 matrix maths several times faster than float32."""
HALF_WEIGHTS_BELOW_BYTES = 16 * 2**30
"""float32 SDXL holds 13.4 GB after load and peaks near 18 GB: below 16 GiB, store weights in
half precision."""
WARMUP_SIZE = 256


class JobCancelledError(Exception):
    """The job was cancelled between two denoising steps."""


def choose_device(setting: str) -> str:
    """Return the torch device: ``auto`` means cuda where a GPU is present, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Return whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def choose_dtype(setting: str, device: str, *, bf16_cpu: bool | None = None) -> torch.dtype:
    """Return the precision: auto is float16 on cuda, bfloat16 on a CPU with it, else float32."""
    if setting != "auto":
        return _DTYPES[setting]
    if device == "cuda":
        return torch.float16
    return torch.bfloat16 if (cpu_has_bf16() if bf16_cpu is None else bf16_cpu) else torch.float32


def memory_bytes() -> int:
    """Return the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def use_half_weights(setting: str, device: str, dtype: torch.dtype) -> bool:
    """Return whether to store linear and convolution weights in float16, computing in float32."""
    if setting != "auto":
        return setting == "on"
    return device == "cpu" and dtype == torch.float32 and memory_bytes() < HALF_WEIGHTS_BELOW_BYTES


def choose_variant(setting: str, model: str) -> str | None:
    """Return the weight files to load: ``auto`` takes the fp16 files where the model has them.

    A hub id gets ``fp16`` (SDXL-Turbo's fp16 files are half the download and load without a
    conversion); a local folder gets it only when it holds ``*.fp16.safetensors`` files.
    """
    if setting != "auto":
        return setting or None
    folder = Path(model)
    if not folder.is_dir():
        return "fp16"
    return "fp16" if any(folder.glob("*/*.fp16.safetensors")) else None


def load_dtype(
    device: str, dtype: torch.dtype, *, variant: str | None, half_weights: bool
) -> torch.dtype:
    """Return the precision to load in: on a CPU, float16 when the weights end in 16 bits.

    Loading in the checkpoint's own precision maps the files without a copy, and
    :func:`agent.weights.place_weights` then converts one tensor at a time: the peak is the final
    model, not the final model plus the whole checkpoint. A float32 model from full-precision
    files is loaded as float32, so it loses nothing.
    """
    if device == "cpu" and (half_weights or dtype != torch.float32 or variant == "fp16"):
        return torch.float16
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Return the setting name of a torch dtype (``float32`` for ``torch.float32``)."""
    return str(dtype).removeprefix("torch.")


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


@dataclass(frozen=True)
class LoadedModel:
    """What was loaded, for metrics and the state topic."""

    model: str
    device: str
    dtype: str
    pipeline_class: str
    load_seconds: float
    warmup_seconds: float
    levers: str


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
    )

    def __init__(self, encode: Callable[..., Any], size: int) -> None:
        """Wrap ``encode`` with a cache of ``size`` entries."""
        self._encode = encode
        self._size = size
        self._entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.hits = 0
        self.last_hit = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - encode_prompt's own
        """Return cached embeddings for a prompt seen before, else encode and remember them."""
        given_embeddings = any(
            kwargs.get(name) is not None for name in kwargs if name.endswith("_embeds")
        )
        if args or given_embeddings or self._size == 0:
            self.last_hit = False
            return self._encode(*args, **kwargs)
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


class Text2Image:
    """A text-to-image pipeline loaded once, generating one image per call."""

    def __init__(self, options: PipelineOptions) -> None:
        """Load the pipeline, apply the levers, and warm it up.

        Args:
            options: What to load and how.
        """
        # Progress bars are for terminals; the agent reports progress on MQTT instead.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        if options.threads > 0:
            torch.set_num_threads(options.threads)
        started = time.perf_counter()
        self.device = choose_device(options.device)
        self.dtype = choose_dtype(options.dtype, self.device)
        half_weights = use_half_weights(options.half_weights, self.device, self.dtype)
        extra: dict[str, Any] = {}
        levers = [dtype_name(self.dtype)]
        if options.tiny_vae:
            # Loaded first and handed in, so the full VAE is never loaded at all.
            extra["vae"] = AutoencoderTiny.from_pretrained(
                options.tiny_vae, torch_dtype=self.dtype, use_safetensors=True
            )
            levers.append("tiny-vae")
        variant = choose_variant(options.variant, options.model)
        # safetensors only and no remote code: a model folder can never run code of its own.
        self._pipeline: Any = AutoPipelineForText2Image.from_pretrained(
            options.model,
            dtype=load_dtype(self.device, self.dtype, variant=variant, half_weights=half_weights),
            variant=variant,
            use_safetensors=True,
            trust_remote_code=False,
            **extra,
        )
        if self.device != "cpu":
            # Loading lands on the CPU; moving there again would only warn about float16.
            self._pipeline.to(self.device)
        released = sum(
            place_weights(component, self.dtype, half_storage=half_weights)
            for component in self._pipeline.components.values()
            if isinstance(component, torch.nn.Module)
        )
        log.info("weights placed; %.2f GB of mapped checkpoint pages handed back", released / 1e9)
        if half_weights:
            levers.append("half-weights")
        self._pipeline.set_progress_bar_config(disable=True)
        if options.channels_last:
            self._pipeline.unet.to(memory_format=torch.channels_last)
            self._pipeline.vae.to(memory_format=torch.channels_last)
            levers.append("channels-last")
        self._timings = GenerationTimings()
        self.prompt_cache = PromptCache(self._pipeline.encode_prompt, options.prompt_cache_size)

        def timed_encode_prompt(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - pass-through
            begun = time.perf_counter()
            result = self.prompt_cache(*args, **kwargs)
            self._timings.text_encoding += time.perf_counter() - begun
            self._timings.prompt_cache_hit = self.prompt_cache.last_hit
            return result

        # The pipeline calls self.encode_prompt, so an instance attribute wraps it in place.
        self._pipeline.encode_prompt = timed_encode_prompt
        load_seconds = time.perf_counter() - started
        warmup_seconds = self._warm_up() if options.warmup else 0.0
        self.loaded = LoadedModel(
            model=options.model,
            device=self.device,
            dtype=dtype_name(self.dtype),
            pipeline_class=type(self._pipeline).__name__,
            load_seconds=load_seconds,
            warmup_seconds=warmup_seconds,
            levers=",".join(levers),
        )

    def _warm_up(self) -> float:
        """Run one small generation: the first call pays for allocations and kernel choices."""
        begun = time.perf_counter()
        self.generate(
            prompt="warm-up",
            negative_prompt=None,
            width=WARMUP_SIZE,
            height=WARMUP_SIZE,
            steps=1,
            guidance_scale=0.0,
            seed=0,
            on_step=lambda _step, _steps: None,
            cancelled=lambda: False,
        )
        return time.perf_counter() - begun

    def generate(  # noqa: PLR0913 - the request's own fields
        self,
        *,
        prompt: str,
        negative_prompt: str | None,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        seed: int,
        on_step: Callable[[int, int], None],
        cancelled: Callable[[], bool],
    ) -> tuple[Image, GenerationTimings]:
        """Generate one image.

        Args:
            prompt: What to draw.
            negative_prompt: What to avoid, or None.
            width: Width in pixels.
            height: Height in pixels.
            steps: Denoising steps.
            guidance_scale: Classifier-free guidance; 0 turns it off (SDXL-Turbo's way).
            seed: Seed of the initial noise; the same seed gives the same image.
            on_step: Called with (step done, steps) after each denoising step.
            cancelled: Polled after each step; True stops the job.

        Returns:
            The image and the time per stage.

        Raises:
            JobCancelledError: ``cancelled()`` turned True.
        """
        self._timings = timings = GenerationTimings()
        started = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)

        def step_end(
            _pipe: object, step: int, _timestep: object, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            on_step(step + 1, steps)
            if cancelled():
                raise JobCancelledError
            timings.marks["denoised"] = time.perf_counter()
            return kwargs

        with torch.inference_mode():
            output = self._pipeline(
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                callback_on_step_end=step_end,
            )
        finished = time.perf_counter()
        denoised = timings.marks.get("denoised", finished)
        timings.denoising = denoised - started - timings.text_encoding
        timings.decoding = finished - denoised
        return output.images[0], timings
