"""Settings of the model and the generation worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A model's or a LoRA's short name: what requests, lists and Home Assistant's select show."""


class ModelEntry(BaseModel):
    """One installed model: where it loads from and what differs from the agent's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="Hugging Face hub id or local folder.")
    steps: int | None = Field(
        default=None, ge=1, le=50, description="Its denoising steps when a request names none."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, le=30, description="Its guidance scale when a request names none."
    )
    tiny_vae: str = Field(
        default="auto", description="Its tiny decoder, as the tiny_vae setting (auto: by family)."
    )
    lora: str = Field(
        default="",
        description="A LoRA always on for this model, loaded with it: a distillation LoRA "
        "(SDXL-Lightning, Hyper-SD) over a base model; a file, or a hub file as "
        "owner/repo/file.safetensors.",
    )
    timestep_spacing: Literal["", "leading", "trailing"] = Field(
        default="",
        description="Its scheduler's timestep spacing, where the model's own config is not "
        "what its distillation wants (SDXL-Lightning and Hyper-SD want trailing).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_source(cls, value: Any) -> Any:  # noqa: ANN401 - pydantic's hook
        """Take a bare string as the source: ``{"sd-turbo": "stabilityai/sd-turbo"}``."""
        return {"source": value} if isinstance(value, str) else value


class ModelSettings(BaseModel):
    """What the worker loads, how, and how it is restarted."""

    # --- model and worker
    model: str = Field(
        default="stabilityai/sdxl-turbo",
        description="The model loaded at start and used by requests that name none: a name "
        "from models, or a Hugging Face hub id or local folder of a text-to-image pipeline (SDXL "
        "or Stable Diffusion 1.x/2.x: SDXL-Turbo, SD-Turbo, SDXS-512, ...).",
    )
    models: dict[str, ModelEntry] = Field(
        default_factory=dict,
        description="Installed models a request may name, by short name: a JSON object of "
        'name to hub id or folder, or to {"source", "steps", "guidance_scale", "tiny_vae", '
        '"lora", "timestep_spacing"}. '
        "One is resident at a time: a request for another unloads it, then loads that one.",
    )
    lora_dir: Path | None = Field(
        default=None,
        description="Folder of LoRA styles (name.safetensors) requests may apply by name; "
        "unset: <state_dir>/loras.",
    )
    model_variant: str = Field(
        default="auto",
        pattern=r"^[A-Za-z0-9_-]*$",
        description="Weight files to load (diffusers' variant): auto takes the fp16 files of a "
        "hub model, and of a local folder that has them; empty takes the default files.",
    )
    device: Device = Field(
        default="auto", description="Where the model runs: auto picks cuda when present."
    )
    dtype: DType = Field(
        default="auto",
        description="Precision: auto is float16 on cuda, bfloat16 on a CPU with AVX512-BF16 or "
        "AMX; on a CPU without it that computes float16 itself (Arm's asimdhp, as a Pi 5; x86's "
        "AVX512-FP16 or AMX-FP16) float16 where a probe at start (1 s at most) finds it at least "
        "1.25x faster than float32; elsewhere float32 at once.",
    )
    tiny_vae: str = Field(
        default="auto",
        description="Hub id or folder of a tiny decoder (AutoencoderTiny) used instead of the "
        "model's VAE: decoding is many times faster. auto takes the one that matches the "
        "model's family (TAESDXL for SDXL, TAESD for SD 1.x/2.x; none where the model's own is "
        "tiny); empty uses the model's VAE.",
    )
    half_weights: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Keep the weights of linear and convolution layers in float16 and compute "
        "in float32 (each layer upcast while it runs), halving the model's memory at some speed; "
        "auto: on when float32 runs on a CPU with less than 16 GiB of memory.",
    )
    weight_form: Literal["auto", "float16", "int8", "int4"] = Field(
        default="auto",
        description="Form of the UNet's and text encoders' weights on a CPU: float16 as the "
        "model's files hold them; int8 (one scale per output channel) or int4 (one scale per 64 "
        "inputs) quantized once at the first start, written to <state_dir>/weights and mapped "
        "from there after (6.3, 3.3 and 1.8 GiB for SDXL-Turbo). auto takes the largest that fits "
        "in the memory limit (cgroup, else physical) with 0.9 GiB to spare: float16 on an 8 GB "
        "Pi and larger, int8 in 7 GiB, int4 on a 4 GB or 2 GB Pi. On cuda, always float16.",
    )
    channels_last: bool = Field(
        default=True,
        description="Run the UNet and the decoder in channels_last memory format (not with "
        "float16 arithmetic on a CPU, where the weights are used from the model's files as they "
        "lie).",
    )
    packed_weights: bool = Field(
        default=True,
        description="Reorder linear and convolution weights once at load into the layout the "
        "CPU's matrix library (oneDNN) computes with, instead of at every call: bfloat16 on an "
        "x86-64 CPU, weights held in the compute precision (not with half or int8 weights).",
    )
    fused_decoder: bool = Field(
        default=True,
        description="Compute the tiny decoder's (TAESD's) ReLUs and residual sums inside the "
        "convolutions before them (oneDNN post-operations), instead of as separate passes over "
        "the image: on an x86-64 CPU, in bfloat16 or float32, with channels_last.",
    )
    warmup: bool = Field(
        default=True, description="Generate one image at load so the first job is fast."
    )
    warmup_at_default_size: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Warm up at the default width and height instead of 256x256, so the first "
        "job finds the matrix library's kernels for its size already built; auto: on where "
        "images are fast (cuda, or bfloat16 on a CPU), off where one costs many seconds at "
        "every start (float32 or float16 on a CPU, as on a Raspberry Pi).",
    )
    prompt_cache_size: int = Field(
        default=16,
        ge=0,
        le=1024,
        description="Prompt embeddings kept (LRU): a repeated prompt skips the text encoders.",
    )
    torch_threads: int = Field(
        default=0, ge=0, le=256, description="CPU threads for torch; 0 uses every core."
    )
    max_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Runs of a job whose worker died under it before the job fails.",
    )
    journal_keep_s: float = Field(
        default=7 * 86400,
        gt=0,
        description="How long delivered jobs stay in the journal (a resent id gets the stored "
        "result meanwhile).",
    )
    journal_keep_rows: int = Field(
        default=10000, ge=10, description="Delivered jobs kept in the journal at most."
    )
    worker_restart_delay_s: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="Wait before restarting a worker that died; after loads that failed in a row "
        "(a worker killed while loading, say) the wait doubles each time.",
    )
    worker_restart_max_delay_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="Longest wait between two attempts to load the model.",
    )
