"""The weights' integer forms: written once next to the state, mapped after, rebuilt when stale.

On a tiny SDXL pipeline whose layers are as wide as int4 groups (SDXL's are), saved as the hub's
fp16 files; the agent itself where a kill or a full disk is what is tested.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from agent.compare_forms import psnr
from agent.machine.memory import GIB
from agent.model.forms import FORMS, choose_form, form_bytes, stored_layers
from agent.model.pages import MappedPages
from agent.model.pipeline import Text2Image
from agent.model.protocol import PipelineOptions
from agent.model.quantized import StoredLayer, quantize, scheme_of, widen
from tests.conftest import AgentProcess, fill_up, generate, require_command
from tests.tiny_pipeline import build_tiny_pipeline

SDXL_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "sdxl-turbo-config"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """The tiny pipeline with 64-wide layers, saved as fp16 files (mapped when loaded)."""
    source = build_tiny_pipeline(
        tmp_path_factory.mktemp("wide") / "source", (64, 64), text_width=64
    )
    folder = source.parent / "fp16"
    AutoPipelineForText2Image.from_pretrained(source, dtype=torch.float16).save_pretrained(
        folder, variant="fp16"
    )
    (folder / "taesd").symlink_to(source / "taesd")
    return folder


def options(model: Path, weights: Path, form: str, **fields) -> PipelineOptions:
    return PipelineOptions(
        model=str(model),
        tiny_vae=str(model / "taesd"),
        threads=2,
        warmup=False,
        dtype="float32",
        weight_form=form,
        weights_dir=str(weights),
        **fields,
    )


def generate_image(model: Text2Image) -> np.ndarray:
    image, _ = model.generate(
        prompt="a red apple",
        negative_prompt=None,
        width=256,
        height=256,
        steps=1,
        guidance_scale=0.0,
        seed=7,
        on_step=lambda _step, _steps: None,
        cancelled=lambda: False,
    )
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize(
    ("shape", "form", "scheme", "error_below"),
    [
        ((640, 320), "int8", "int8", 0.01),
        ((640, 320), "int4", "int4", 0.12),
        ((128, 64, 3, 3), "int4", "int4", 0.12),
        ((320, 4, 3, 3), "int4", "int8", 0.01),  # 4 inputs: no whole group, int8 kept
    ],
)
def test_a_widened_weight_is_its_quantized_self_in_either_layout(shape, form, scheme, error_below):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.05
    layer = StoredLayer("layer", scheme_of(shape, form), shape)
    assert layer.scheme == scheme
    integers, scale = quantize(weight, layer)
    assert (integers.dtype, tuple(integers.shape)) == (layer.weight.dtype, layer.weight.shape)
    assert (scale.dtype, tuple(scale.shape)) == (layer.scale.dtype, layer.scale.shape)
    widened = [widen(integers, scale, torch.empty(shape))]
    if len(shape) == 4:
        widened.append(
            widen(integers, scale, torch.empty(shape).contiguous(memory_format=torch.channels_last))
        )
    for result in widened:
        assert torch.equal(result, widened[0])  # the same numbers in either layout
        assert float((result - weight).norm() / weight.norm()) < error_below


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_a_form_is_written_once_mapped_after_and_close_to_float32(wide_model, tmp_path, form):
    full = generate_image(Text2Image(options(wide_model, tmp_path, "float16", half_weights="off")))
    model = Text2Image(options(wide_model, tmp_path / "weights", form))
    assert f"{form}-weights" in model.loaded.levers
    copies = sorted((tmp_path / "weights").iterdir())
    assert [path.name for path in copies] == [
        f"text_encoder.{form}.safetensors",
        f"text_encoder_2.{form}.safetensors",
        f"unet.{form}.safetensors",
    ]
    written = {path: path.stat().st_mtime_ns for path in copies}
    # Told as mapped, file-backed memory (the log, edgeai_model_weight_bytes), not as copied.
    assert model.loaded.mapped_bytes > 0.95 * sum(path.stat().st_size for path in copies)
    pages = MappedPages()
    pipeline = model._pipeline
    schemes = set()
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        for layer in component.modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                assert layer.weight.dtype in (torch.int8, torch.uint8)
                # Mapped from the copy, read-only file pages: never an anonymous copy.
                assert pages.holds(layer.weight)
                assert str(pages.mapping_of(layer.weight)) != "None"
                schemes.add(layer.weight.dtype)
    # int4 keeps int8 where inputs do not make whole groups (the first convolution's 4).
    assert schemes == ({torch.int8} if form == "int8" else {torch.int8, torch.uint8})
    image = generate_image(model)
    assert psnr(image, full) > (35 if form == "int8" else 20)

    again = Text2Image(options(wide_model, tmp_path / "weights", form))
    assert {path: path.stat().st_mtime_ns for path in copies} == written  # mapped, not rewritten
    assert np.array_equal(generate_image(again), image)


def test_a_stale_or_corrupt_copy_is_rebuilt_and_other_forms_removed(wide_model, tmp_path, caplog):
    weights = tmp_path / "weights"
    reference = generate_image(Text2Image(options(wide_model, weights, "int4")))
    copy = weights / "unet.int4.safetensors"

    # The model's files changed (a new download): the copy made from the old ones is rebuilt.
    source = wide_model / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    os.utime(source, ns=(time.time_ns(), time.time_ns()))
    caplog.set_level("INFO")
    model = Text2Image(options(wide_model, weights, "int4"))
    assert "int4 weights of the unet written" in caplog.text
    assert "the model's files changed since it was made" in caplog.text
    assert "text_encoder.int4" not in caplog.text  # the others are still good
    assert np.array_equal(generate_image(model), reference)

    # Cut short, or overwritten with garbage: rebuilt, never trusted.
    for damage in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     "):
        data = copy.read_bytes()
        copy.write_bytes(damage or data[: len(data) // 2])
        caplog.clear()
        model = Text2Image(options(wide_model, weights, "int4"))
        assert "int4 weights of the unet written" in caplog.text
        assert "unreadable" in caplog.text
        assert np.array_equal(generate_image(model), reference)

    # Another form's copies and a half-written file make room for the form in use.
    (weights / "unet.int8.safetensors.partial").write_bytes(b"x" * 1000)
    caplog.clear()
    Text2Image(options(wide_model, weights, "int8"))
    assert sorted(path.name for path in weights.iterdir()) == [
        "text_encoder.int8.safetensors",
        "text_encoder_2.int8.safetensors",
        "unet.int8.safetensors",
    ]
    assert "unet.int4.safetensors (0.00 GB): not the weights in use" in caplog.text
    Text2Image(options(wide_model, weights, "float16"))
    assert list(weights.iterdir()) == []  # float16 needs no copy at all


def sdxl_turbo_sizes() -> dict[str, int]:
    """Return SDXL-Turbo's heavy weights in each form, from its real configs (no weights)."""
    if not (SDXL_CONFIG / "unet" / "config.json").exists():
        pytest.skip(f"SDXL-Turbo's configs are not at {SDXL_CONFIG}")
    with torch.device("meta"):
        modules = [
            UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(SDXL_CONFIG / "unet")
            ),
            CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder")),
            CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder_2")
            ),
        ]
    return {form: form_bytes(modules, form) for form in FORMS}


def test_auto_takes_the_largest_form_that_fits_the_memory_limit():
    sizes = sdxl_turbo_sizes()
    assert 6.2 * GIB < sizes["float16"] < 6.4 * GIB
    assert 3.2 * GIB < sizes["int8"] < 3.4 * GIB
    assert 1.7 * GIB < sizes["int4"] < 1.9 * GIB
    # A Pi 5's memory as Linux reports it (MemTotal), and cgroup limits as systemd sets them.
    for limit, expected in [
        (63 * GIB, "float16"),  # nothing changes on a large machine
        (int(7.86 * GIB), "float16"),  # an 8 GB Pi: as today
        (7500 * 2**20, "float16"),  # the same under the service's MemoryMax=7500M
        (7 * GIB, "int8"),
        (int(3.95 * GIB), "int4"),  # a 4 GB Pi
        (int(1.96 * GIB), "int4"),  # a 2 GB Pi: nothing fits, the smallest
    ]:
        form, why = choose_form("auto", "cpu", sizes, limit)
        assert form == expected, (limit / GIB, why)
        assert "GiB" in why
    assert "none fits" in choose_form("auto", "cpu", sizes, 2 * GIB)[1]
    assert choose_form("int8", "cpu", sizes, 63 * GIB)[0] == "int8"  # as set, whatever fits
    assert choose_form("int4", "cuda", sizes, 2 * GIB)[0] == "float16"  # CPU forms only


def test_sdxl_layers_all_take_int4_but_the_first_convolution():
    if not (SDXL_CONFIG / "unet" / "config.json").exists():
        pytest.skip(f"SDXL-Turbo's configs are not at {SDXL_CONFIG}")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SDXL_CONFIG / "unet")
        )
    layers = stored_layers(unet, "int4")
    assert [layer.name for layer in layers if layer.scheme == "int8"] == ["conv_in"]


@pytest.fixture
def wide_agent(broker, wide_model):
    """Make agents on the wide model with int4 weights; each is stopped after the test."""
    made: list[AgentProcess] = []

    def make(state: Path, **env: str) -> AgentProcess:
        env = {"EDGEAI_WEIGHT_FORM": "int4", "EDGEAI_WARMUP": "false", **env}
        made.append(AgentProcess(broker, wide_model, state, env))
        return made[-1]

    yield make
    for agent in made:
        agent.stop()


def image_digest(result: dict) -> str:
    assert result["status"] == "ok", result
    return hashlib.sha256(base64.b64decode(result["image"]["b64"])).hexdigest()


def test_a_kill_during_the_write_leaves_nothing_trusted(
    broker, wide_agent, tmp_path, memory_cgroup
):
    strace = require_command("strace")
    reference = wide_agent(tmp_path / "reference")
    reference.start()
    client = broker.client()
    expected = image_digest(generate(client, reference, seed=3))
    reference.stop()

    state = tmp_path / "state"
    partial = state / "weights" / "unet.int4.safetensors.partial"
    # kill -9 of the worker at its third write into the UNet's copy: the header and one
    # layer's scales are written, the rest is not.
    killed = wide_agent(state)
    killed.cgroup = memory_cgroup(2 * GIB)  # as on a 2 GB Pi
    killed.prefix = [
        strace,
        *("-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64", "-P", str(partial)),
        *("-e", "inject=pwrite64:signal=KILL:when=3"),
    ]
    killed.start(wait=False)
    killed.wait_state("error", timeout=120)
    # Stop the agent itself (strace's child) as systemd would; strace ends with it.
    [daemon] = (
        Path(f"/proc/{killed.process.pid}/task/{killed.process.pid}/children").read_text().split()
    )
    os.kill(int(daemon), signal.SIGTERM)
    killed.process.wait(timeout=60)
    assert "model load failed" in killed.log()
    weights = sorted(path.name for path in (state / "weights").iterdir())
    assert "unet.int4.safetensors" not in weights  # nothing a later start would trust
    assert "unet.int4.safetensors.partial" in weights  # what the kill left

    again = wide_agent(state)
    again.start()
    log = again.log()  # both starts': the text encoders were written once, the UNet once, whole
    assert log.count("int4 weights of the text_encoder written") == 1
    assert log.count("int4 weights of the unet written") == 1
    assert sorted(path.name for path in (state / "weights").iterdir()) == [
        "text_encoder.int4.safetensors",
        "text_encoder_2.int4.safetensors",
        "unet.int4.safetensors",
    ]
    assert image_digest(generate(client, again, seed=3)) == expected
    client.close()


def test_a_disk_too_small_for_the_copy_is_a_clear_error_until_there_is_room(
    broker, wide_agent, tmp_path, small_disk, memory_cgroup
):
    state = tmp_path / "state"
    state.mkdir()
    (small_disk / "weights").mkdir()
    (state / "weights").symlink_to(small_disk / "weights")
    fill_up(small_disk, leave=200_000)  # the tiny UNet's int4 copy needs about 0.3 MB
    agent = wide_agent(state, EDGEAI_WORKER_RESTART_DELAY_S="1")
    agent.cgroup = memory_cgroup(2 * GIB)
    agent.start(wait=False)
    agent.wait_state("error", timeout=120)
    status, _, body = agent.http_get("/healthz")
    assert status == 503
    error = json.loads(body)["error"]
    assert error.startswith("WeightsNotStoredError: the int4 weights of the unet need 0.")
    assert "no room, 0.00 GB free" in error
    assert not list(small_disk.glob("weights/*.partial"))  # nothing half-written takes the space
    told = "model load failed: WeightsNotStoredError: the int4 weights of the unet need"
    deadline = time.monotonic() + 10
    while told not in agent.log() and time.monotonic() < deadline:
        time.sleep(0.1)  # the line comes when the worker has exited
    assert told in agent.log()
    assert "Traceback" not in agent.log()

    (small_disk / "other-data").unlink()  # room made: the next attempt writes it and loads
    agent.wait_state("idle", timeout=120)
    client = broker.client()
    image_digest(generate(client, agent))
    client.close()


def test_the_comparison_script_draws_a_row_per_form(wide_model, tmp_path):
    out = tmp_path / "forms.png"
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGEAI_")}
    env |= {
        "EDGEAI_MODEL": str(wide_model),
        "EDGEAI_TINY_VAE": str(wide_model / "taesd"),
        "EDGEAI_STATE_DIR": str(tmp_path / "state"),
        "EDGEAI_DTYPE": "float32",
    }
    command = [sys.executable, "-m", "agent.compare_forms", "--out", str(out), "--size", "128"]
    completed = subprocess.run(
        [*command, "--prompt", "a red apple", "--prompt", "a blue door", "--seeds", "1,2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rows float16, int8, int4; 2 prompt(s) x seeds [1, 2]" in completed.stdout
    assert re.search(r"int4: 4 images in \d+ s PSNR [\d.]+ dB", completed.stdout)
    grid = Image.open(out)
    assert grid.size == (120 + 4 * 128, 3 * 128)
    rows = [
        np.asarray(grid.crop((120, 128 * row, 120 + 4 * 128, 128 * (row + 1)))) for row in range(3)
    ]
    assert not np.array_equal(rows[0], rows[2])  # int4 moved the pixels, a little
    assert not (tmp_path / "state" / "weights-compare").exists()  # its copies were removed
