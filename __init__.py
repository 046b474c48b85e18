"""dmsteps as a ComfyUI custom-node pack: ComfyUI imports this file as a package when the repository is
cloned into ``ComfyUI/custom_nodes/``. The nodes live in ``dmsteps_cli/integrations/comfyui.py`` (they load
without torch) and, the refine node, ``dmsteps_cli/integrations/comfyui_refine.py`` (torch, which ComfyUI
always has; offered wherever torch is importable)."""

if __package__:  # imported as a package, as ComfyUI imports a custom-node folder (pytest imports it bare)
    import importlib.util

    from .dmsteps_cli.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .dmsteps_cli.integrations.comfyui_scheduler import register

    register()  # "dmsteps" in KSampler's scheduler list

    if importlib.util.find_spec("torch") is not None:
        from .dmsteps_cli.integrations import comfyui_refine

        NODE_CLASS_MAPPINGS = {**NODE_CLASS_MAPPINGS, **comfyui_refine.NODE_CLASS_MAPPINGS}
        NODE_DISPLAY_NAME_MAPPINGS = {**NODE_DISPLAY_NAME_MAPPINGS, **comfyui_refine.NODE_DISPLAY_NAME_MAPPINGS}

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
