"""Hand step tables to the samplers that consume them.

- ``dmsteps_cli.integrations.diffusers``: ``apply_table(scheduler, table, nfe)`` makes a diffusers
  scheduler (UniPC, DPM-Solver++ multistep, Euler, flow-matching Euler) run a table's steps, also
  when a pipeline calls ``set_timesteps`` itself. Imports torch and diffusers (lazily, on use).
- ``dmsteps_cli.integrations.exports``: plain lists and strings for k-diffusion / ComfyUI
  (``sigmas_for``), stable-diffusion.cpp (``sdcpp_sigmas``) and the official DPM-Solver / UniPC
  code (``dpm_solver_t``), as plain decimals that every consumer parses as meant (``decimals``).
  Imports neither torch nor numpy.
- ``dmsteps_cli.integrations.comfyui``: ComfyUI nodes that output SIGMAS (a bundled table, a table
  file, steps optimized for the connected model); the repository's root ``__init__.py`` registers
  them when the repository is cloned into ``ComfyUI/custom_nodes``. Imports torch inside the nodes.

Importing this package imports neither submodule.
"""
