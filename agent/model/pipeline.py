"""The diffusers pipeline: loading, device and precision, the speed levers, one generation.

Only the worker process imports this module, so only the worker imports torch. The levers
(each a setting, each measured by ``tests/bench/pipeline.py``): a tiny decoder (TAESDXL) instead
of the full VAE, bfloat16 where the CPU computes it natively, channels_last, weights packed once
for oneDNN, the tiny decoder's activations computed inside its convolutions, half-precision
weight storage where memory is short, a warm-up at load, and a prompt-embedding cache.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderTiny, AutoPipelineForImage2Image, AutoPipelineForText2Image

from agent.machine.memory import memory_limit, return_free_memory
from agent.model.encode_cache import EncodeCache
from agent.model.family import choose_tiny_decoder, read_family
from agent.model.fused import fuse_relu_convolutions
from agent.model.half_probe import half_compute_speedup
from agent.model.lora import LoraSet, lora_file
from agent.model.pages import MappedPages
from agent.model.placing import WeightPlan, place_pipeline_weights
from agent.model.precision import (
    choose_device,
    choose_dtype,
    choose_variant,
    dtype_name,
    fuses_decoder,
    load_dtype,
    use_half_weights,
)
from agent.model.prompt_cache import GenerationTimings, PromptCache
from agent.model.protocol import PipelineOptions, Ready, denoising_steps
from agent.model.warmup import warmup_size
from agent.model.weights import channels_last_layout

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL.Image import Image

log = logging.getLogger(__name__)


class JobCancelledError(Exception):
    """The job was cancelled between two denoising steps."""


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
        limit = memory_limit()
        # float16 arithmetic is weighed against the float32 path this machine would take:
        # float16-stored weights upcast at each use where memory is short.
        upcast = use_half_weights(options.half_weights, self.device, torch.float32, limit.bytes)
        self.dtype = choose_dtype(
            options.dtype,
            self.device,
            half_speedup=lambda: half_compute_speedup(upcast=upcast),
        )
        # Integer forms widen into the buffer float16 storage upcasts into: they imply it.
        half_weights = options.weight_form in ("int8", "int4") or use_half_weights(
            options.half_weights, self.device, self.dtype, limit.bytes
        )
        extra: dict[str, Any] = {}
        levers = [dtype_name(self.dtype)]
        if self._load_tiny_decoder(options, extra):
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
        channels_last = channels_last_layout(options.channels_last, self.device, self.dtype)
        plan = WeightPlan(
            form_setting=options.weight_form,
            weights_dir=options.weights_dir,
            half_weights=half_weights,
            packed_weights=options.packed_weights,
            channels_last=channels_last,
        )
        placement, form = place_pipeline_weights(
            self._pipeline, plan, device=self.device, compute=self.dtype, limit=limit
        )
        # The lean path gives freed memory back after each job, so between jobs the worker holds
        # its weights' file pages and little else.
        self._lean = half_weights or form != "float16" or placement.mapped > 0
        if form != "float16":
            levers.append(f"{form}-weights")
        elif half_weights:
            levers.append("half-weights")
        self._pipeline.set_progress_bar_config(disable=True)
        fused = self._fuse_decoder(options, channels_last=channels_last)
        layout_levers = {
            "channels-last": channels_last,
            "packed-weights": placement.packed_layers > 0,
            "fused-decoder": fused,
        }
        levers.extend(name for name, applied in layout_levers.items() if applied)
        self._timings = GenerationTimings()
        self.prompt_cache = PromptCache(self._pipeline.encode_prompt, options.prompt_cache_size)

        # Text encoders left in their mapped files run once per new prompt (the cache answers
        # the rest): marked cold after each run, their pages are the first the kernel takes back
        # when memory is short, before the UNet's, which run at every step.
        pages = MappedPages()
        encoder_files = [
            mapping
            for name in ("text_encoder", "text_encoder_2")
            if isinstance(component := self._pipeline.components.get(name), torch.nn.Module)
            for mapping in pages.ranges_of(component)
        ]

        def timed_encode_prompt(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - pass-through
            begun = time.perf_counter()
            result = self.prompt_cache(*args, **kwargs)
            self._timings.text_encoding += time.perf_counter() - begun
            self._timings.prompt_cache_hit = self.prompt_cache.last_hit
            if not self.prompt_cache.last_hit:
                pages.mark_cold(encoder_files)
            return result

        if self._styles(options):
            levers.append("base-lora")
        # The pipeline calls self.encode_prompt, so an instance attribute wraps it in place.
        self._pipeline.encode_prompt = timed_encode_prompt
        self._image2image = self._image_to_image(timed_encode_prompt)
        load_seconds = time.perf_counter() - started
        warmed_size = (
            warmup_size(
                options.warmup_at_default_size, options.default_size, self.device, self.dtype
            )
            if options.warmup
            else None
        )
        warmup_seconds = self._warm_up(*warmed_size) if warmed_size else 0.0
        self.loaded = Ready(
            model=options.model,
            device=self.device,
            dtype=dtype_name(self.dtype),
            pipeline_class=type(self._pipeline).__name__,
            load_seconds=load_seconds,
            warmup_seconds=warmup_seconds,
            levers=",".join(levers),
            mapped_bytes=placement.mapped,
            copied_bytes=placement.copied,
            warmup_size=warmed_size,
            name=options.name,
        )

    def _styles(self, options: PipelineOptions) -> bool:
        """Make the LoRA set; put on the model's own LoRA and timestep spacing, where named.

        SDXL-Lightning and Hyper-SD ship as a LoRA over SDXL's base model, made for trailing
        timesteps where the base model's scheduler leads. Prompt embeddings made under other
        LoRA styles are stale (a LoRA may adapt the text encoders): the prompt cache starts
        again whenever the styles change.

        Returns:
            Whether a LoRA is always on.
        """
        self.loras = LoraSet(self._pipeline, self.prompt_cache.clear, self.dtype)
        if options.timestep_spacing:
            scheduler = self._pipeline.scheduler
            self._pipeline.scheduler = type(scheduler).from_config(
                scheduler.config, timestep_spacing=options.timestep_spacing
            )
        if not options.base_lora:
            return False
        self.loras.permanent = (("base", lora_file(options.base_lora), 1.0),)
        self.loras.apply(())
        return True

    def _load_tiny_decoder(self, options: PipelineOptions, extra: dict[str, Any]) -> bool:
        """Read the model's family; load the tiny decoder that matches it into ``extra["vae"]``.

        Loaded first and handed to the pipeline, so the full VAE is never loaded at all.

        Returns:
            Whether one was loaded (not where the setting is empty or the model's own is tiny).
        """
        self.family = read_family(options.model)
        tiny_decoder, note = choose_tiny_decoder(options.tiny_vae, self.family)
        if note:
            log.info("%s", note)
        if not tiny_decoder:
            return False
        extra["vae"] = AutoencoderTiny.from_pretrained(
            tiny_decoder, torch_dtype=self.dtype, use_safetensors=True
        )
        return True

    def _image_to_image(self, encode_prompt: Callable[..., Any]) -> Any:  # noqa: ANN401 - diffusers' pipeline
        """Return the image-to-image pipeline over the same components (no weight copied).

        Its encoder is the VAE's own: TAESDXL's where the tiny VAE is used. The same picture is
        encoded once (:class:`EncodeCache`), prompts go through the same cache as text-to-image.
        """
        pipeline = AutoPipelineForImage2Image.from_pipe(self._pipeline)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.encode_prompt = encode_prompt
        vae = self._pipeline.vae
        vae.encode = EncodeCache(vae.encode)
        return pipeline

    def _fuse_decoder(self, options: PipelineOptions, *, channels_last: bool) -> bool:
        """Fold the tiny decoder's ReLUs and residual sums into its convolutions where it pays.

        The decoder may be the one handed in or the model's own (SDXS-512's): the same layers.

        Returns:
            Whether any were folded.
        """
        return bool(
            isinstance(self._pipeline.vae, AutoencoderTiny)
            and fuses_decoder(
                options.fused_decoder, self.device, self.dtype, channels_last=channels_last
            )
            and fuse_relu_convolutions(self._pipeline.vae)
        )

    def _warm_up(self, width: int, height: int) -> float:
        """Run one generation: the first call pays for allocations and kernel choices."""
        begun = time.perf_counter()
        self.generate(
            prompt="warm-up",
            negative_prompt=None,
            width=width,
            height=height,
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
        init_image: Image | None = None,
        strength: float | None = None,
    ) -> tuple[Image, GenerationTimings]:
        """Generate one image, from text alone or from a picture.

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
            init_image: The picture to start from, already width x height; None for
                text-to-image.
            strength: How far the picture may change (0.01 <= s <= 1), with ``init_image``.

        Returns:
            The image and the time per stage.

        Raises:
            JobCancelledError: ``cancelled()`` turned True.
        """
        self._timings = timings = GenerationTimings()
        started = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        schedule, steps_run = denoising_steps(steps, strength if init_image else None)

        def step_end(
            _pipe: object, step: int, _timestep: object, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            on_step(step + 1, steps_run)
            if cancelled():
                raise JobCancelledError
            timings.marks["denoised"] = time.perf_counter()
            return kwargs

        common: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "num_inference_steps": schedule,
            "guidance_scale": guidance_scale,
            "generator": generator,
            "callback_on_step_end": step_end,
        }
        with torch.inference_mode():
            if init_image is None:
                output = self._pipeline(width=width, height=height, **common)
            else:
                output = self._image2image(image=init_image, strength=strength, **common)
        finished = time.perf_counter()
        denoised = timings.marks.get("denoised", finished)
        timings.denoising = denoised - started - timings.text_encoding
        timings.decoding = finished - denoised
        if self._lean:
            return_free_memory()
        return output.images[0], timings
