"""The generation path in one process, on SDXL-Turbo's real architecture with random weights.

Random weights cost exactly what the real ones cost. The first run builds the model once from
``../shared/sdxl-turbo-config/`` (float16 safetensors in the hub's layout, so loading is measured
too; the CLIP vocabulary is rebuilt from the BPE file that the ``open_clip_torch`` wheel ships)
and caches it in ``~/.cache/edgeai-bench`` (``EDGEAI_BENCH_CACHE``). One case runs per process:

  (a) the seed app: AutoPipelineForText2Image, float32, 800x800, 10 steps, default guidance
  (b) plain diffusers at SDXL-Turbo's reference: 512x512, 1 step, guidance 0, float32
  (c) the agent's generation path with its default settings, in this process
  (d) the agent's path forced to float32 (a Raspberry Pi has no bfloat16)
  (e) the agent as on a Raspberry Pi: float32 compute, float16 weight storage

``tests/bench/suite.py`` (``scripts/bench``) runs (b) from here beside the agent end to end, and
``tests/bench/versus_openvino.py`` runs (b) and (c) from here beside OpenVINO. Cases (b) to (e)
are timed warm, with a new prompt each time.

    .venv/bin/python tests/bench/pipeline.py --case c --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT.parent / "shared" / "sdxl-turbo-config"
CACHE = Path(os.environ.get("EDGEAI_BENCH_CACHE", Path.home() / ".cache" / "edgeai-bench"))
MODEL = CACHE / "sdxl-turbo-random"
TAESDXL = CACHE / "taesdxl-random"
SD_TURBO = CACHE / "sd-turbo-random"
"""SD-Turbo's architecture (SD 2.1's UNet, OpenCLIP ViT-H's text encoder, SD's VAE)."""
LORAS = CACHE / "loras"
"""A rank-16 LoRA over SDXL's attention layers, as style LoRAs are made (``style-sdxl``)."""
OPEN_CLIP = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
PROMPT = "a happy black dog, cartoon style, highly detailed"
REPEATS = 3
"""Timed generations per 512x512 case by default (--repeats)."""
CASES = {
    "a": "seed app: float32, 800x800, 10 steps, guidance 5.0",
    "b": "plain diffusers: float32, 512x512, 1 step, guidance 0",
    "c": "agent, default settings: 512x512, 1 step",
    "d": "agent forced to float32: 512x512, 1 step",
    "e": "agent as on an 8 GB Pi: float32, half weights, 512x512, 1 step",
}


# --- building the random-weight models ----------------------------------------------------
def clip_vocabulary(folder: Path) -> None:
    """Write CLIP's vocab.json and merges.txt, rebuilt from open_clip's BPE file."""
    from tests.tiny_pipeline import write_bpe_files  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", download, OPEN_CLIP],
            check=True,
        )
        wheel = next(Path(download).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            text = gzip.decompress(archive.read(BPE_MEMBER)).decode("utf-8")
    write_bpe_files(folder, text.split("\n")[1 : 49152 - 256 - 2 + 1])


def build_model() -> None:
    """Build SDXL-Turbo's architecture with random weights; save it as float16 safetensors."""
    import torch  # noqa: PLC0415
    from diffusers import (  # noqa: PLC0415
        AutoencoderKL,
        AutoencoderTiny,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (  # noqa: PLC0415
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    started = time.perf_counter()
    torch.manual_seed(0)
    for name in ("tokenizer", "tokenizer_2"):
        clip_vocabulary(MODEL / name)
        for config in ("tokenizer_config.json", "special_tokens_map.json"):
            (MODEL / name / config).write_bytes((CONFIGS / name / config).read_bytes())
    components = {
        "unet": UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(CONFIGS / "unet")
        ),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae")),
        "text_encoder": CLIPTextModel(
            CLIPTextConfig.from_json_file(CONFIGS / "text_encoder" / "config.json")
        ),
        "text_encoder_2": CLIPTextModelWithProjection(
            CLIPTextConfig.from_json_file(CONFIGS / "text_encoder_2" / "config.json")
        ),
        "scheduler": EulerAncestralDiscreteScheduler.from_config(
            EulerAncestralDiscreteScheduler.load_config(CONFIGS / "scheduler")
        ),
        "tokenizer": CLIPTokenizer.from_pretrained(MODEL / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(MODEL / "tokenizer_2"),
    }
    pipeline = StableDiffusionXLPipeline(**components).to(torch.float16)
    pipeline.save_pretrained(MODEL, safe_serialization=True)
    taesd = AutoencoderTiny.from_config(AutoencoderTiny.load_config(CONFIGS / "taesdxl")).to(
        torch.float16
    )
    taesd.save_pretrained(TAESDXL, safe_serialization=True)
    print(f"built the random-weight model in {time.perf_counter() - started:.0f} s: {MODEL}")


# --- one case, in its own process ---------------------------------------------------------
def build_sd_turbo_model() -> None:
    """Build SD-Turbo's architecture with random weights; save it as float16 safetensors.

    The UNet is SD 2.1's shape as ``sd-turbo/SOURCES.md`` gives it (its config file was not
    recovered), the text encoder and scheduler are SD-Turbo's own configs, the VAE is SD's
    standard one, the tokenizer is SDXL's second (the same OpenCLIP vocabulary, pad ``!``).
    """
    import torch  # noqa: PLC0415
    from diffusers import (  # noqa: PLC0415
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    torch.manual_seed(0)
    sd = CONFIGS / "sd-turbo"
    pipeline = StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        ),
        vae=AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
        ),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(sd / "text_encoder/config.json")),
        tokenizer=CLIPTokenizer.from_pretrained(MODEL / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(
            EulerDiscreteScheduler.load_config(sd / "scheduler")
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    pipeline.save_pretrained(SD_TURBO, safe_serialization=True)


def build_lora() -> None:
    """Write a rank-16 LoRA over SDXL-Turbo's attention projections (random, small weights)."""
    import torch  # noqa: PLC0415
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model_state_dict  # noqa: PLC0415

    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", torch_dtype=torch.float16)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=16, lora_alpha=16, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    with tempfile.TemporaryDirectory() as folder:
        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
        )
        LORAS.mkdir(parents=True, exist_ok=True)
        shutil.move(
            Path(folder) / "pytorch_lora_weights.safetensors", LORAS / "style-sdxl.safetensors"
        )


def build_missing() -> None:
    """Build whichever random-weight model or LoRA the cache lacks."""
    if not (MODEL / "model_index.json").exists() or not (TAESDXL / "config.json").exists():
        build_model()
    if not (SD_TURBO / "model_index.json").exists():
        build_sd_turbo_model()
    if not (LORAS / "style-sdxl.safetensors").exists():
        build_lora()


def peak_rss_gb() -> float:
    """Return this process's peak resident memory in GB (VmHWM).

    Not ``ru_maxrss``: Linux carries that across fork and exec, so a case started by a big
    parent (one that has just built or exported the model) would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def generate_image(model: Any, prompt: str, seed: int = 0, size: int = 512) -> tuple[Any, Any]:
    """Return ``model.generate``'s (image, timings) for one SDXL-Turbo image: 1 step, no guidance.

    ``model`` is the agent's ``Text2Image``, called the way its worker calls it for a job.
    """
    return model.generate(
        prompt=prompt,
        negative_prompt=None,
        width=size,
        height=size,
        steps=1,
        guidance_scale=0.0,
        seed=seed,
        on_step=lambda _step, _steps: None,
        cancelled=lambda: False,
    )


def png_seconds(image: object) -> float:
    begun = time.perf_counter()
    image.save(io.BytesIO(), format="PNG")  # type: ignore[attr-defined]
    return time.perf_counter() - begun


def run_plain(case: str, repeats: int = REPEATS) -> dict[str, object]:
    """Cases (a) and (b): diffusers as the seed app used it, timed from outside."""
    import torch  # noqa: PLC0415
    from diffusers import AutoPipelineForText2Image  # noqa: PLC0415

    begun = time.perf_counter()
    pipeline = AutoPipelineForText2Image.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    load = time.perf_counter() - begun
    stages = {"text_encoders": 0.0, "decode": 0.0}
    encode, decode = pipeline.encode_prompt, pipeline.vae.decode

    def timed(stage: str, call):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = call(*args, **kwargs)
            stages[stage] += time.perf_counter() - start
            return result

        return wrapper

    pipeline.encode_prompt = timed("text_encoders", encode)
    pipeline.vae.decode = timed("decode", decode)
    arguments = (
        {"width": 800, "height": 800, "num_inference_steps": 10}
        if case == "a"
        else {"width": 512, "height": 512, "num_inference_steps": 1, "guidance_scale": 0.0}
    )
    if case != "a":  # (b) is timed warm, like the agent after its warm-up
        pipeline(prompt="warm-up", **arguments)
    runs = []
    for repeat in range(1 if case == "a" else repeats):
        stages = {"text_encoders": 0.0, "decode": 0.0}
        begun = time.perf_counter()
        image = pipeline(
            prompt=f"{PROMPT} {repeat}", generator=torch.Generator().manual_seed(0), **arguments
        ).images[0]
        total = time.perf_counter() - begun
        encoding = png_seconds(image)
        runs.append(
            {
                "text_encoders_s": stages["text_encoders"],
                "denoise_s": total - stages["text_encoders"] - stages["decode"],
                "decode_s": stages["decode"],
                "image_encoding_s": encoding,
                "total_s": total + encoding,
            }
        )
    return {"load_s": load, **median_run(runs)}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Return the run with the median total time, and every run's total."""
    ordered = sorted(runs, key=lambda run: run["total_s"])
    return {**ordered[len(ordered) // 2], "runs": [round(run["total_s"], 2) for run in runs]}  # type: ignore[dict-item]


def run_agent(case: str, repeats: int = REPEATS) -> dict[str, object]:
    """Cases (c), (d) and (e): the agent's own generation path."""
    from agent.model.pipeline import Text2Image  # noqa: PLC0415
    from agent.model.protocol import PipelineOptions  # noqa: PLC0415
    from agent.settings import Settings  # noqa: PLC0415

    defaults = PipelineOptions.from_settings(Settings(node_id="bench"))
    options = dataclasses.replace(
        defaults,
        model=str(MODEL),
        tiny_vae=str(TAESDXL),
        dtype="float32" if case in "de" else defaults.dtype,
        # This machine has more than 16 GiB, so auto leaves half weights off; a Pi turns them on.
        half_weights="on" if case == "e" else "off" if case == "d" else defaults.half_weights,
    )
    begun = time.perf_counter()
    model = Text2Image(options)
    load = time.perf_counter() - begun
    runs = []
    for repeat in range(repeats):  # a new prompt each time: the prompt cache stays out of it
        begun = time.perf_counter()
        image, timings = generate_image(model, f"{PROMPT} {repeat}")
        total = time.perf_counter() - begun
        encoding = png_seconds(image)
        runs.append(
            {
                "text_encoders_s": timings.text_encoding,
                "denoise_s": timings.denoising,
                "decode_s": timings.decoding,
                "image_encoding_s": encoding,
                "total_s": total + encoding,
            }
        )
    return {
        "load_s": load,
        "warmup_s": model.loaded.warmup_seconds,
        "levers": model.loaded.levers,
        **median_run(runs),
    }


def run_case(case: str, repeats: int = REPEATS) -> dict[str, object]:
    """Run one case in this process."""
    return run_plain(case, repeats) if case in "ab" else run_agent(case, repeats)


# --- the whole benchmark --------------------------------------------------------------------
def parse_arguments(
    description: str | None, cases: str, *, rounds: bool = False
) -> argparse.Namespace:
    """Parse ``--cases`` (what to run, ``cases`` by default) and the child's hidden ``--case``.

    Args:
        description: The script's help text.
        cases: The cases run by default, one letter each.
        rounds: Also take ``--rounds``: how many times to run every case, interleaved.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=cases)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    if rounds:
        parser.add_argument("--rounds", type=int, default=1)
    return parser.parse_args()


def report_result(result: dict[str, object]) -> None:
    """In a case's own process: add its peak memory and print the line the parent reads."""
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result))


def case_in_fresh_process(
    python: str | Path, script: str | Path, case: str, repeats: int = REPEATS
) -> dict[str, object]:
    """Run ``script --case CASE`` with ``python`` and return what its report_result printed."""
    completed = subprocess.run(
        [python, script, "--case", case, "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [text for text in completed.stdout.splitlines() if text.startswith("RESULT ")]
    if not lines:
        print(completed.stdout[-2000:], completed.stderr[-4000:])
        raise SystemExit(f"case {case} failed")
    return json.loads(lines[0].removeprefix("RESULT "))  # type: ignore[no-any-return]


def main() -> None:
    """Run the one case ``--case`` names in this process and print its RESULT line."""
    arguments = parse_arguments(__doc__, "c")
    if not (MODEL / "model_index.json").exists() or not (TAESDXL / "config.json").exists():
        build_model()
    report_result(run_case(arguments.case or arguments.cases[0], arguments.repeats))


if __name__ == "__main__":
    main()
