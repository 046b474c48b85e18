"""dmsteps as a ComfyUI custom-node pack: ComfyUI imports this file as a package when the repository is
cloned into ``ComfyUI/custom_nodes/``. The nodes live in ``dmsteps_cli/integrations/comfyui.py``."""

if __package__:  # imported as a package, as ComfyUI imports a custom-node folder (pytest imports it bare)
    from .dmsteps_cli.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .dmsteps_cli.integrations.comfyui_scheduler import register

    register()  # "dmsteps" in KSampler's scheduler list

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
