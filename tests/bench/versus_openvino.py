"""Measure optimum-intel's OpenVINO SDXL pipeline against the agent's PyTorch path, in one run.

Same random-weight SDXL-Turbo as ``tests/bench/pipeline.py`` (run that once first: it builds the
model), same 512x512, 1 step, guidance 0. optimum-intel pins its own transformers and
huggingface-hub, so it lives in a separate environment; this script runs there and starts the
PyTorch cases with the project's own ``.venv``, each case in a fresh process:

  (b) plain diffusers, float32                      (project venv)
  (c) the agent's default path                      (project venv)
  (o) OpenVINO, its default precision on this CPU   (bfloat16 where the CPU has it)
  (f) OpenVINO, float32 inference precision
  (y) OpenVINO, default precision, shapes left dynamic (any size per request, as the agent needs)
  (q) as (y) with 8-bit weights (optimum-intel's default for models over a billion weights;
      exported separately, into ``sdxl-turbo-random-openvino-int8``; not in the default cases)

For each OpenVINO case it times the text encoders, the UNet, the full VAE decoder and the TAESDXL
decoder converted to OpenVINO; "total" counts the TAESDXL decoder, as the agent's path does.
The first run exports the OpenVINO model (weights kept in float16, no 8-bit compression) into
``~/.cache/edgeai-bench/sdxl-turbo-random-openvino``.

    python3 -m venv /tmp/ov
    /tmp/ov/bin/pip install "optimum-intel[openvino,diffusers]==2.2.0"
    /tmp/ov/bin/python tests/bench/versus_openvino.py --cases coy --rounds 3
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from pipeline import (  # noqa: E402 - shared with the main benchmark
    case_in_fresh_process,
    median_run,
    parse_arguments,
    report_result,
)

CACHE = Path(os.environ.get("EDGEAI_BENCH_CACHE", Path.home() / ".cache" / "edgeai-bench"))
MODEL = CACHE / "sdxl-turbo-random"
TAESDXL = CACHE / "taesdxl-random"
EXPORTED = CACHE / "sdxl-turbo-random-openvino"
EXPORTED_INT8 = CACHE / "sdxl-turbo-random-openvino-int8"
PROMPT = "a happy black dog, cartoon style, highly detailed"
REPEATS = 3
SIZE = 512
CASES = {
    "b": "plain diffusers, float32",
    "c": "the agent's default path (PyTorch)",
    "o": "OpenVINO, default precision, static 512x512 shapes",
    "f": "OpenVINO, float32 precision, static 512x512 shapes",
    "y": "OpenVINO, default precision, dynamic shapes (as loaded)",
    "q": "OpenVINO, 8-bit weights (optimum's default for large models), dynamic shapes",
}


def export(folder: Path, *, int8: bool) -> None:
    """Export the random-weight pipeline to OpenVINO IR once (8-bit weights if ``int8``)."""
    from optimum.intel import OVStableDiffusionXLPipeline  # noqa: PLC0415

    begun = time.perf_counter()
    pipeline = OVStableDiffusionXLPipeline.from_pretrained(
        MODEL, export=True, compile=False, load_in_8bit=int8
    )
    pipeline.save_pretrained(folder)
    print(f"exported in {time.perf_counter() - begun:.0f} s: {folder}", file=sys.stderr)


def ensure_exported(cases: str) -> None:
    """Export the OpenVINO models the cases need and the cache lacks."""
    if not (EXPORTED / "model_index.json").exists():
        export(EXPORTED, int8=False)
    if "q" in cases and not (EXPORTED_INT8 / "model_index.json").exists():
        export(EXPORTED_INT8, int8=True)


def tiny_decoder(core: object, precision: dict[str, str]) -> object:
    """Return TAESDXL's decoder converted to OpenVINO and compiled for the CPU."""
    import openvino  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderTiny  # noqa: PLC0415

    decoder = AutoencoderTiny.from_pretrained(TAESDXL, torch_dtype=torch.float32).decoder.eval()
    latents = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    model = openvino.convert_model(decoder, example_input=latents)
    return core.compile_model(model, "CPU", precision)  # type: ignore[attr-defined]


def run_openvino(case: str) -> dict[str, object]:
    """Cases (o) and (f): load, reshape to 512x512, compile, time the stages."""
    import numpy as np  # noqa: PLC0415
    import openvino  # noqa: PLC0415
    from optimum.intel import OVStableDiffusionXLPipeline  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    precision = {"INFERENCE_PRECISION_HINT": "f32"} if case == "f" else {}
    begun = time.perf_counter()
    pipeline = OVStableDiffusionXLPipeline.from_pretrained(
        EXPORTED_INT8 if case == "q" else EXPORTED, compile=False, ov_config=precision
    )
    if case not in "yq":
        pipeline.reshape(batch_size=1, height=SIZE, width=SIZE, num_images_per_prompt=1)
        # optimum-intel sizes the UNet's batch for classifier-free guidance (2 per image);
        # SDXL-Turbo runs without it, so the UNet gets batch 1 like every other part.
        unet = pipeline.unet.model
        unet.reshape(
            {
                port: [1, *list(port.get_partial_shape())[1:]]
                for port in unet.inputs
                if port.get_partial_shape().rank.get_length() > 1
            }
        )
    pipeline.compile()
    decoder = tiny_decoder(openvino.Core(), precision)
    load = time.perf_counter() - begun
    stages: dict[str, float] = {}
    for stage, component in (
        ("text_encoders", pipeline.text_encoder),
        ("text_encoders", pipeline.text_encoder_2),
        ("unet", pipeline.unet),
    ):
        # A pipeline part's __call__ calls self.forward: timing the instance's forward is enough.
        forward = component.forward

        def timed(*args: object, _stage: str = stage, _forward=forward, **kwargs: object) -> object:
            start = time.perf_counter()
            result = _forward(*args, **kwargs)
            stages[_stage] = stages.get(_stage, 0.0) + time.perf_counter() - start
            return result

        component.forward = timed
    arguments = {"width": SIZE, "height": SIZE, "num_inference_steps": 1, "guidance_scale": 0.0}
    pipeline(prompt="warm-up", **arguments)
    decoder(np.zeros((1, 4, SIZE // 8, SIZE // 8), np.float32))
    runs = []
    for repeat in range(REPEATS):
        stages.clear()
        begun = time.perf_counter()
        latents = pipeline(prompt=f"{PROMPT} {repeat}", output_type="latent", **arguments).images
        latent_s = time.perf_counter() - begun
        start = time.perf_counter()
        pixels = next(iter(decoder(np.asarray(latents, np.float32)).values()))
        tiny_s = time.perf_counter() - start
        start = time.perf_counter()
        rgb = (np.clip(pixels[0], 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(rgb).save(io.BytesIO(), format="PNG")
        encoding_s = time.perf_counter() - start
        start = time.perf_counter()
        pipeline.vae_decoder(latent_sample=np.asarray(latents, np.float32))
        full_s = time.perf_counter() - start
        runs.append(
            {
                "text_encoders_s": stages.get("text_encoders", 0.0),
                "unet_s": stages.get("unet", 0.0),
                "vae_decode_s": full_s,
                "tiny_decode_s": tiny_s,
                "image_encoding_s": encoding_s,
                "total_s": latent_s + tiny_s + encoding_s,
            }
        )
    return {"load_s": load, **median_run(runs)}


def run_torch(case: str) -> dict[str, object]:
    """Cases (b) and (c), through the project's own benchmark in the project's venv."""
    result = case_in_fresh_process(ROOT / ".venv" / "bin" / "python", HERE / "pipeline.py", case)
    result["unet_s"] = result.pop("denoise_s")
    result["tiny_decode_s" if case == "c" else "vae_decode_s"] = result.pop("decode_s")
    return result


def generation_s(result: dict[str, object]) -> float:
    """Return a case's seconds from prompt to pixels: its total less the PNG encoding.

    PNG's cost depends on the picture (random weights give the PyTorch path noise and
    OpenVINO's export a flat image), not on the engine, so the comparison leaves it out.
    """
    return float(result["total_s"]) - float(result["image_encoding_s"])  # type: ignore[arg-type]


def main() -> None:
    """Run every case in a fresh process, ``--rounds`` times interleaved; print table and ratios."""
    arguments = parse_arguments(__doc__, "bcofy", rounds=True)
    if arguments.case:
        report_result(run_openvino(arguments.case))
        return
    ensure_exported(arguments.cases)
    rounds = run_rounds(arguments.cases, arguments.rounds)
    print_table(arguments.cases, rounds)
    ratios: dict[str, list[float]] = {}
    for top in "bc":
        for bottom in "ofyq":
            if top in arguments.cases and bottom in arguments.cases:
                ratios[f"{top}/{bottom}"] = [
                    round(generation_s(results[top]) / generation_s(results[bottom]), 2)
                    for results in rounds
                ]
    print(
        "\nprompt to pixels, first case's time over the second's (above 1: the second is faster):"
    )
    for pair, values in ratios.items():
        print(f"{pair}: median {statistics.median(values):.2f}, rounds {values}")
    print(json.dumps({"rounds": rounds, "ratios": ratios}, indent=2))


def run_rounds(cases: str, count: int) -> list[dict[str, dict[str, object]]]:
    """Run every case in a fresh process, ``count`` times, in a rotated order each round."""
    rounds: list[dict[str, dict[str, object]]] = []
    for index in range(count):
        # Each round starts one case later, so no case always runs first or last.
        shift = index % len(cases)
        order = cases[shift:] + cases[:shift]
        results: dict[str, dict[str, object]] = {}
        for case in order:
            if case in "bc":
                results[case] = run_torch(case)
            else:
                results[case] = case_in_fresh_process(sys.executable, __file__, case)
            print(f"round {index + 1}: case {case} done", file=sys.stderr)
        rounds.append(results)
    return rounds


def print_table(cases: str, rounds: list[dict[str, dict[str, object]]]) -> None:
    """Print every case of every round as a row of stage times, memory and load time."""
    columns = (
        "text_encoders_s",
        "unet_s",
        "vae_decode_s",
        "tiny_decode_s",
        "image_encoding_s",
        "total_s",
    )
    print(
        "\n| round | case | text encoders s | UNet s | VAE decode s | TAESDXL decode s | PNG s"
        " | total s | prompt to pixels s | peak RSS GB | load s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for index, results in enumerate(rounds, 1):
        for case in cases:
            result = results[case]
            cells = " | ".join(
                f"{result[column]:.2f}" if column in result else "-" for column in columns
            )
            print(
                f"| {index} | ({case}) {CASES[case]} | {cells} | {generation_s(result):.2f}"
                f" | {result['peak_rss_gb']:.2f} | {result['load_s']:.1f} |"
            )


if __name__ == "__main__":
    main()
