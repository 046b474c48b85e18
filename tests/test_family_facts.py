"""The facts the ComfyUI and diffusers integrations read of a schedule family (schedules.FAMILIES),
checked against each family's own alpha, sigma and timesteps rather than against its name: one test
parametrized over every family, as diffusers' scheduler tests serve every scheduler."""

import numpy as np
import pytest

from dmsteps_cli.baselines import MODEL_SAMPLINGS, model_sampling
from dmsteps_cli.errors import BadInput
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.schedules import EDM, FAMILIES, PRESETS

ONE_PER_FAMILY = {}
for preset, (make, _) in PRESETS.items():
    ONE_PER_FAMILY.setdefault(make().family, make())


def test_every_family_has_a_preset_here():
    assert set(ONE_PER_FAMILY) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sampler_sigma_is_kappa_says_whether_log_sigma_steps_are_lambda_steps(family):
    s = ONE_PER_FAMILY[family]
    t = np.linspace(max(s.eps_default, 0.01 * s.T), 0.9 * s.T, 7)
    kappa = np.allclose(s.sampler_sigma(t), np.exp(-s.lam(t)), rtol=1e-12)
    assert kappa == FAMILIES[family].sampler_sigma_is_kappa


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_timestep_is_scaled_t_matches_the_model_timestep(family):
    s = ONE_PER_FAMILY[family]
    t = np.linspace(s.eps_default, s.T, 5)
    if FAMILIES[family].timestep_is_scaled_t:
        np.testing.assert_allclose(s.model_timestep(t), 1000.0 * t, rtol=1e-15)
    else:
        assert not np.allclose(s.model_timestep(t), 1000.0 * t)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_comfy_sampling_names_a_model_sampling_whose_timesteps_invert_its_sigmas(family):
    """Where ComfyUI has a model_sampling for the family it holds sigmas in the family's sampler
    sigma from about sigma(eps) to sigma(T), and sigma(timestep(sigma)) gives them back; where it
    has none, asking for one is a one-line BadInput."""
    s = ONE_PER_FAMILY[family]
    name = FAMILIES[family].comfy_sampling
    if name is None:
        with pytest.raises(BadInput, match="ComfyUI's schedulers know"):
            model_sampling(s)
        return
    assert name in MODEL_SAMPLINGS
    ms = model_sampling(s, s.default_shift)
    assert np.all(np.diff(ms.sigmas) > 0)
    assert ms.sigmas[-1] == pytest.approx(float(s.sampler_sigma(s.t_max if np.isfinite(s.t_max) else s.T)), rel=2e-2)
    probe = ms.sigmas[[0, len(ms.sigmas) // 3, -1]]
    back = [float(ms.sigma(ms.timestep(float(v)))) for v in probe]
    np.testing.assert_allclose(back, probe, rtol=1e-9)


def test_describe_and_end_difference():
    assert get_schedule("scaled_linear").describe() == "scaled_linear"
    assert get_schedule("flow").describe(3.0) == "flow (shift 3)"
    assert get_schedule("flow").describe() == "flow"
    assert EDM(0.002, 80).describe() == "edm (sigma 0.002 to 80)"
    assert EDM(0.002, 80).end_difference(EDM(0.002, 120)) == "sigma_max 80 vs 120"
    assert EDM(0.002, 80).end_difference(EDM(0.002, 80)) == ""
    assert get_schedule("scaled_linear").end_difference(get_schedule("linear")) == ""


# --- no family or solver name tested outside the registries ---------------------------------------

def _names_in(node) -> set:
    """The family- or solver-naming words of an expression (``schedule.family``, ``solver``,
    ``table["schedule"]["family"]``, ``cfg.get("solver")``)."""
    import ast

    words = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            words.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            words.add(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            words.add(sub.value)
    return {w for w in words if w in ("family", "solver")}


def _literals(node) -> set:
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def test_no_family_or_solver_name_is_tested_outside_the_registries():
    """``family == "flow"``, ``solver in ("unipc", "dpmpp")`` and the like appear in no module but the
    registries (schedules.py, solvers.py): every other reader asks the record for the fact."""
    import ast
    from pathlib import Path

    from dmsteps_cli.solvers import ALIASES, SOLVERS

    names = set(FAMILIES) | set(SOLVERS) | set(ALIASES)
    package = Path(__file__).resolve().parent.parent / "dmsteps_cli"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name in ("schedules.py", "solvers.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if any(_literals(s) & names for s in sides) and any(_names_in(s) for s in sides):
                found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not found, found


def test_the_name_test_check_sees_a_real_one():
    import ast

    node = ast.parse('table["schedule"]["family"] == "flow"').body[0].value
    assert _names_in(node.left) == {"family"} and _literals(node.comparators[0]) == {"flow"}
