"""The tiny text-to-image pipeline fixtures of tests/tiny.py (SDXL, SD3) reload as their pipeline
class, encode prompts with classifier-free guidance and sample 16x16 images in 2 steps on CPU."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny import save_tiny_sd3, save_tiny_sdxl  # noqa: E402

CALL = dict(prompt=["a red cat"], negative_prompt=["blue"], num_inference_steps=2, guidance_scale=3.0,
            output_type="np")


def _load(folder):
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_image(pipe):
    with torch.no_grad():
        image = pipe(**CALL, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)
    assert np.isfinite(image).all()


def test_tiny_sdxl(tmp_path):
    pipe = _load(save_tiny_sdxl(tmp_path / "sdxl"))
    assert type(pipe) is diffusers.StableDiffusionXLPipeline
    assert pipe.unet.config.addition_embed_type == "text_time"
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=["a red cat"], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=["blue"])
        other = pipe.encode_prompt(prompt=["a blue dog"], device="cpu", do_classifier_free_guidance=False)[0]
        zeroed = pipe.encode_prompt(prompt=["a red cat"], device="cpu", do_classifier_free_guidance=True)
    prompt_embeds, negative_embeds, pooled, negative_pooled = embeds
    assert prompt_embeds.shape == negative_embeds.shape == (1, 8, 16 + 24)
    assert pooled.shape == negative_pooled.shape == (1, 12)
    assert all(torch.isfinite(t).all() for t in embeds)
    assert not torch.allclose(prompt_embeds, negative_embeds) and not torch.allclose(prompt_embeds, other)
    # no negative prompt: force_zeros_for_empty_prompt gives zero negative embeddings
    assert not zeroed[1].any() and not zeroed[3].any()
    _check_image(pipe)


def test_tiny_sd3(tmp_path):
    pipe = _load(save_tiny_sd3(tmp_path / "sd3"))
    assert type(pipe) is diffusers.StableDiffusion3Pipeline
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=["a red cat"], prompt_2=None, prompt_3=None, device="cpu",
                                    num_images_per_prompt=1, do_classifier_free_guidance=True,
                                    negative_prompt=["blue"], max_sequence_length=16)
        other = pipe.encode_prompt(prompt=["a blue dog"], prompt_2=None, prompt_3=None, device="cpu",
                                   do_classifier_free_guidance=False, max_sequence_length=16)[0]
    prompt_embeds, negative_embeds, pooled, negative_pooled = embeds
    # 8 CLIP tokens (16 + 24 wide, zero-padded to T5's 48) then 16 T5 tokens
    assert prompt_embeds.shape == negative_embeds.shape == (1, 8 + 16, 48)
    assert not prompt_embeds[:, :8, 40:].any()
    assert pooled.shape == negative_pooled.shape == (1, 16 + 24)
    assert all(torch.isfinite(t).all() for t in embeds)
    assert not torch.allclose(prompt_embeds, negative_embeds)
    assert not torch.allclose(prompt_embeds[:, :8], other[:, :8])  # the CLIP part
    assert not torch.allclose(prompt_embeds[:, 8:], other[:, 8:])  # the T5 part
    _check_image(pipe)
