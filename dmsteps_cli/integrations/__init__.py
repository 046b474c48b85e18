"""Hand step tables to the samplers that consume them.

- ``dmsteps_cli.integrations.diffusers``: ``apply_table(scheduler, table, nfe)`` makes a diffusers
  scheduler (UniPC, DPM-Solver++ multistep, Euler, flow-matching Euler) run a table's steps, also
  when a pipeline calls ``set_timesteps`` itself. Imports torch and diffusers (lazily, on use).
- ``dmsteps_cli.integrations.exports``: plain lists and strings for k-diffusion / ComfyUI
  (``sigmas_for``), stable-diffusion.cpp (``sdcpp_sigmas``) and the official DPM-Solver / UniPC
  code (``dpm_solver_t``). Imports neither torch nor numpy.

Importing this package imports neither submodule.
"""
