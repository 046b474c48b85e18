"""Tiny random-weight diffusers models for tests (built in a few milliseconds, CPU only)."""

import torch

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                 norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"))

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1,
                sample_size=4, patch_size=2, num_embeds_ada_norm=5)


def tiny_unet(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**TINY_UNET).eval()


def tiny_dit(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(**TINY_DIT).eval()


def save_pipeline(root, model, scheduler, folder: str = "unet"):
    """A pipeline-style folder: ``root/<folder>`` (the model) and ``root/scheduler``."""
    model.save_pretrained(root / folder)
    scheduler.save_pretrained(root / "scheduler")
    return root
