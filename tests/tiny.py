"""Test helpers: tiny random-weight diffusers models (built in milliseconds, CPU only) and a recorder
of the orders a diffusers multistep scheduler runs."""

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


def tiny_cond_unet(seed: int = 0, num_class_embeds: int = 4):
    """``tiny_unet`` with a class embedding of ``num_class_embeds`` rows (classes 0 ... n - 1)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**TINY_UNET, num_class_embeds=num_class_embeds).eval()


def tiny_dit(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(**TINY_DIT).eval()


def save_pipeline(root, model, scheduler, folder: str = "unet"):
    """A pipeline-style folder: ``root/<folder>`` (the model) and ``root/scheduler``."""
    model.save_pretrained(root / folder)
    scheduler.save_pretrained(root / "scheduler")
    return root


def save_tiny_text_to_image(root, scheduler=None):
    """A tiny random Stable-Diffusion-style pipeline folder (UNet2DConditionModel, AutoencoderKL,
    CLIP text encoder and a word-level CLIP tokenizer written here), 16x16 images, 8x8 latents."""
    import json

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    words = ["a", "photo", "of", "cat", "dog", "red", "blue"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          attention_head_dim=4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
                                  sample_size=16)
    scheduler = scheduler or diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012, prediction_type="v_prediction")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def record_orders(sched):
    """Log the order of each step the scheduler runs (UniPC: this_order; DPM-Solver++: which update)."""
    orders = []
    import diffusers

    if isinstance(sched, diffusers.UniPCMultistepScheduler):
        step = sched.step

        def logged_step(*args, **kwargs):
            out = step(*args, **kwargs)
            orders.append(sched.this_order)
            return out

        sched.step = logged_step
    else:
        for k, name in ((1, "dpm_solver_first_order_update"), (2, "multistep_dpm_solver_second_order_update"),
                        (3, "multistep_dpm_solver_third_order_update")):
            fn = getattr(sched, name)

            def logged(*args, _fn=fn, _k=k, **kwargs):
                orders.append(_k)
                return _fn(*args, **kwargs)

            setattr(sched, name, logged)
    return orders


def mixture_evaluator(name: str, seeds=range(6)):
    """An Evaluator of a 3-component Gaussian mixture in 16 dimensions (sample shape (1, 4, 4), std
    0.1, means uniform in [-1, 1], seed 1) under the preset ``name``, and that schedule."""
    import numpy as np

    from dmsteps_cli.checkpoints import Checkpoint
    from dmsteps_cli.evaluate import Evaluator
    from dmsteps_cli.mixtures import GaussianMixture
    from dmsteps_cli.schedule_sources import get_schedule

    s = get_schedule(name)
    means = torch.tensor(np.random.default_rng(1).uniform(-1, 1, size=(3, 16)))
    ck = Checkpoint(kind="gmm", schedule=s, prediction_type="sample", sample_shape=(1, 4, 4), num_classes=None,
                    source="test", model=GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)))
    return Evaluator(ck, ck.denoiser(), seeds, s.T, s.eps_default, "cpu"), s
