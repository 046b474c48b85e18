"""``checkpoints.load_checkpoint`` in its steps: the folder's layout, its schedule, the network's
config, its weights; each step alone on small folders of config files, and the whole against a
real UNet folder where the shared digits model is present."""

import json
from pathlib import Path

import pytest
import torch

from dmsteps_cli.checkpoints import (
    checkpoint_schedule,
    folder_layout,
    load_checkpoint,
    load_weights,
    model_config,
)
from dmsteps_cli.errors import BadInput
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.schedules import same_schedule

torch.set_num_threads(1)
DIGITS = Path("/work/models/digits-model")
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "num_train_timesteps": 1000}
UNET = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_folder_layout_tells_pipelines_bare_models_and_text_to_image_apart(tmp_path):
    write(tmp_path / "pipe" / "unet" / "config.json", UNET)
    assert folder_layout(tmp_path / "pipe").model_dir == tmp_path / "pipe" / "unet"
    write(tmp_path / "dit" / "transformer" / "config.json", {})
    assert folder_layout(tmp_path / "dit").model_dir == tmp_path / "dit" / "transformer"
    write(tmp_path / "bare" / "config.json", UNET)
    bare = folder_layout(tmp_path / "bare")
    assert (bare.model_dir, bare.text, bare.index) == (tmp_path / "bare", False, None)
    write(tmp_path / "t2i" / "model_index.json", {"text_encoder": ["transformers", "CLIPTextModel"]})
    text = folder_layout(tmp_path / "t2i")
    assert text.text and text.model_dir is None and text.index["text_encoder"][0] == "transformers"
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no unet/, transformer/ or config.json"):
        folder_layout(tmp_path / "empty")


def test_checkpoint_schedule_reads_the_config_and_checks_the_one_given(tmp_path):
    write(tmp_path / "m" / "scheduler" / "scheduler_config.json", SD_SCHEDULER)
    read = checkpoint_schedule(tmp_path / "m", None, text=False)
    assert same_schedule(read.schedule.identity(), get_schedule("scaled_linear").identity())
    assert checkpoint_schedule(tmp_path / "m", "scaled_linear", text=False).schedule.name == read.schedule.name
    with pytest.raises(BadInput, match="differs from the checkpoint's scheduler config"):
        checkpoint_schedule(tmp_path / "m", "linear", text=False)
    (tmp_path / "none").mkdir()
    with pytest.raises(BadInput, match="has no scheduler config") as exc:
        checkpoint_schedule(tmp_path / "none", None, text=False)
    assert exc.value.field == "schedule"
    assert checkpoint_schedule(tmp_path / "none", "linear", text=False).schedule.name == "linear"
    write(tmp_path / "edm" / "scheduler_config.json", {"_class_name": "EDMEulerScheduler"})
    with pytest.raises(BadInput, match="preconditioning"):
        checkpoint_schedule(tmp_path / "edm", None, text=False)


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "VQModel"}, "unsupported model class 'VQModel'"),
    ({"time_embedding_type": "fourier"}, "score-SDE VE models"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 0}, "field 'num_class_embeds' must be a positive integer"),
    ({"out_channels": 3}, "neither in_channels"),
])
def test_model_config_refuses_what_dmsteps_cannot_run(tmp_path, change, message):
    write(tmp_path / "config.json", {**UNET, **change})
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(BadInput, match=message):
        model_config(tmp_path, "m")


def test_model_config_reads_shape_classes_and_null_class(tmp_path):
    write(tmp_path / "u" / "config.json", {**UNET, "num_class_embeds": 11})
    write(tmp_path / "u" / "class_conditioning.json", {"null_class": 10})
    (tmp_path / "u" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    got = model_config(tmp_path / "u", "m")
    assert (got.kind, got.class_name, got.shape, got.num_classes, got.null_class) == (
        "unet", "UNet2DModel", (1, 8, 8), 11, 10)
    write(tmp_path / "d" / "config.json", {"_class_name": "DiTTransformer2DModel", "sample_size": 4})
    (tmp_path / "d" / "diffusion_pytorch_model.bin").write_bytes(b"")
    dit = model_config(tmp_path / "d", "m")
    assert (dit.kind, dit.shape, dit.num_classes, dit.null_class) == ("transformer", (4, 4, 4), 1000, 1000)
    write(tmp_path / "w" / "config.json", UNET)
    with pytest.raises(BadInput, match="no weights"):
        model_config(tmp_path / "w", "m")


def test_load_weights_refuses_corrupt_weights_in_one_line(tmp_path):
    write(tmp_path / "config.json", UNET)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(BadInput, match="cannot load UNet2DModel") as exc:
        load_weights(model_config(tmp_path, "m"), "m", "cpu", torch.float32)
    assert "\n" not in str(exc.value)


@pytest.mark.skipif(not (DIGITS / "training.json").is_file(), reason="the shared digits model is not trained here")
def test_the_steps_make_the_checkpoint_load_checkpoint_makes():
    ckpt = load_checkpoint(DIGITS)
    layout = folder_layout(DIGITS)
    config = model_config(layout.model_dir, str(DIGITS))
    network = load_weights(config, str(DIGITS), "cpu", torch.float32)
    assert (ckpt.kind, ckpt.sample_shape, ckpt.model_class) == (config.kind, config.shape, config.class_name)
    assert same_schedule(ckpt.schedule.identity(), checkpoint_schedule(DIGITS, None, False).schedule.identity())
    ours, theirs = network.state_dict(), ckpt.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any(p.requires_grad for p in network.parameters()) and not network.training
