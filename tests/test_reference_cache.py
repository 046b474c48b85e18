"""The reference solution: its convergence rule, and the on-disk cache that computes it once.

Model calls are counted by wrapping the denoiser: a reference read from the cache costs only the
step that carries x_S and x_2S from eps to sigma 0 (one call per batch of noises each, ``TO_ZERO``). The
convergence rule is checked against independent solves (x_S, x_2S and a much finer one) and, for a
mixture whose ODE has a closed form, against the exact solution.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from dmsteps_cli import get_schedule
from dmsteps_cli.checkpoints import load_checkpoint, mixture_checkpoint, network_denoiser
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import Evaluator, rms_per_sample
from dmsteps_cli.reference_rule import REF_NAME, REF_SOLVER, REF_TOLERANCE, ReferenceRule, estimated_error
from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.reference_cache import (ReferenceCache, default_folder, key_of, model_fingerprint, open_cache,
                                         settings)

torch.set_num_threads(1)
TO_ZERO = 2  # calls per batch of noises that carry x_S and x_2S to sigma 0 (docs/cli.md, "One frame")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "COLUMNS": "1000"}


def mixture(seed: int = 1, shift: float = 0.0):
    means = torch.tensor(np.random.default_rng(seed).uniform(-1, 1, size=(3, 16))) + shift
    return mixture_checkpoint(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), get_schedule("vp-linear"))


class Counted:
    """A denoiser that records the batch size of every call."""

    def __init__(self, denoiser):
        self.denoiser, self.batches = denoiser, []

    def __call__(self, x, *args):
        self.batches.append(x.shape[0])
        return self.denoiser(x, *args)


def evaluator(ckpt, seeds, cache, ref_steps=64, denoiser=None):
    counted = Counted(denoiser or network_denoiser(ckpt))
    s = ckpt.schedule
    return Evaluator(ckpt, counted, seeds, s.T, s.eps_default, "cpu", ref_steps, cache=cache), counted


def quad(ev, nfe):
    return grid_lambda("quad", ev.schedule, nfe, ev.T, ev.eps)


# --- the cache ------------------------------------------------------------------------------------

def test_a_second_evaluator_reads_every_reference_solution(tmp_path):
    ckpt = mixture()
    first, _ = evaluator(ckpt, range(6), ReferenceCache(tmp_path))
    e1 = first.errors(quad(first, 40), "unipc", 3, "bh2")  # small enough to double S at least once
    assert first.reference_steps > 128
    cache = ReferenceCache(tmp_path)
    second, counted = evaluator(ckpt, range(6), cache)
    e2 = second.errors(quad(second, 40), "unipc", 3, "bh2")
    # the 40 steps measured and, per S compared, x_S and x_2S carried to sigma 0 (one call each); no solve
    assert counted.batches == [6] * (40 + 2 * (len(first_steps(first)) - 1))
    assert cache.misses == 0 and cache.written == 0 and cache.hits == 6 * (len(first_steps(first)))
    assert torch.equal(second.reference, first.reference) and np.array_equal(e1, e2)
    assert second.reference_info == first.reference_info
    assert (tmp_path / "references" / second.rule.stored.entries[None].key / "settings.json").is_file()


def first_steps(ev) -> list[int]:
    """Every S the evaluator solved: ref_steps, 2 ref_steps, ..., its reference's."""
    steps, s = [], 64
    while s <= ev.reference_steps:
        steps.append(s)
        s *= 2
    return steps


def test_more_noises_compute_only_the_new_ones(tmp_path):
    ckpt = mixture()
    first, _ = evaluator(ckpt, range(4), ReferenceCache(tmp_path))
    cache = ReferenceCache(tmp_path)
    second, counted = evaluator(ckpt, range(8), cache)
    # seeds 4..7 only, at S = 64 and 2S = 128; then all 8, at S and 2S, carried to sigma 0 (one call each)
    assert counted.batches == [4] * (64 + 128) + [8] * 2
    assert cache.hits == cache.misses == cache.written == 4 * 2
    assert torch.equal(second.reference[:4], first.reference)
    files = sorted(p.name for p in (tmp_path / "references" / second.rule.stored.entries[None].key / f"{REF_NAME}-128").iterdir())
    assert files == [f"{s}.npy" for s in sorted(range(8), key=str)]


def test_changed_weights_change_the_key(tmp_path):
    ckpt = mixture()
    evaluator(ckpt, range(3), ReferenceCache(tmp_path))
    cache = ReferenceCache(tmp_path)
    moved, counted = evaluator(mixture(shift=1e-9), range(3), cache)  # every mean moved by 1e-9
    assert cache.hits == 0 and cache.misses == 6 and sum(counted.batches) == 3 * (64 + 128 + 2)
    assert len(list((tmp_path / "references").iterdir())) == 2
    assert model_fingerprint(mixture()) == model_fingerprint(ckpt) != model_fingerprint(mixture(shift=1e-9))


def test_the_conditioning_and_the_interval_are_part_of_the_key():
    ckpt = mixture()
    base = dict(T=1.0, eps=1e-3, noise_scale=1.0, state_dtype=torch.float64)
    keys = {key_of(settings(ckpt, **base)), key_of(settings(ckpt, **base, class_label=3)),
            key_of(settings(ckpt, **base, class_label=4)), key_of(settings(ckpt, **base, guidance_scale=1.5)),
            key_of(settings(ckpt, **{**base, "eps": 2e-3})), key_of(settings(ckpt, **{**base, "T": 0.99})),
            key_of(settings(ckpt, **{**base, "state_dtype": torch.float32}))}
    assert len(keys) == 7
    other = mixture_checkpoint(ckpt.model, get_schedule("vp-cosine"))
    assert key_of(settings(other, **base)) not in keys
    assert key_of(settings(mixture(), **base)) in keys  # the same mixture built again


def test_unreadable_files_are_computed_again(tmp_path):
    ckpt = mixture()
    first, _ = evaluator(ckpt, range(5), ReferenceCache(tmp_path))
    folder = tmp_path / "references" / first.rule.stored.entries[None].key / f"{REF_NAME}-128"
    (folder / "0.npy").write_bytes(b"not numpy")
    (folder / "1.npy").write_bytes((folder / "1.npy").read_bytes()[:60])  # truncated
    np.save(folder / "2.npy", np.zeros((4, 4)))  # the wrong shape
    np.save(folder / "3.npy", np.full((1, 4, 4), np.nan))
    (folder / "4.npy").unlink()
    cache = ReferenceCache(tmp_path)
    second, counted = evaluator(ckpt, range(5), cache)
    assert counted.batches == [5] * (128 + 2)  # seeds 0..4 again, for S = 128 only; the calls to sigma 0
    assert cache.unreadable == 4 and cache.misses == 5 and cache.hits == 5 and cache.written == 5
    torch.testing.assert_close(second.reference, first.reference, rtol=0, atol=1e-12)
    third_cache = ReferenceCache(tmp_path)
    evaluator(ckpt, range(5), third_cache)
    assert third_cache.hits == 10 and third_cache.misses == 0  # the files were replaced


def test_without_a_cache_everything_is_computed(tmp_path, monkeypatch):
    monkeypatch.setenv("DMSTEPS_CACHE", str(tmp_path / "default"))
    ckpt = mixture()
    evaluator(ckpt, range(2), ReferenceCache(tmp_path / "given"))
    _, counted = evaluator(ckpt, range(2), None)
    assert sum(counted.batches) == 2 * (64 + 128 + 2)
    assert open_cache(tmp_path / "given", enabled=False) is None
    assert not (tmp_path / "default").exists()


def test_a_cache_that_cannot_be_written_leaves_the_run_unchanged(tmp_path):
    (tmp_path / "file").write_text("x")
    cache = ReferenceCache(tmp_path / "file" / "cache")  # under a regular file: nothing can be created
    ev, _ = evaluator(mixture(), range(2), cache)
    plain, _ = evaluator(mixture(), range(2), None)
    assert torch.equal(ev.reference, plain.reference)
    assert cache.written == 0 and cache.write_errors and "file" in cache.write_errors[0]


def test_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("DMSTEPS_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_folder() == tmp_path / "own"
    monkeypatch.delenv("DMSTEPS_CACHE")
    assert default_folder() == tmp_path / "xdg" / "dmsteps"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_folder() == tmp_path / "home" / ".cache" / "dmsteps"
    assert open_cache(tmp_path / "x").root == tmp_path / "x"
    cache = ReferenceCache(tmp_path / "y")
    assert open_cache(cache) is cache
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput) as exc:
        open_cache(tmp_path / "f")
    assert exc.value.field == "cache" and "exists and is not a folder" in str(exc.value)
    with pytest.raises(BadInput, match="^cache is empty: give a folder$"):
        open_cache("")


# --- the convergence rule -------------------------------------------------------------------------

def test_the_accepted_reference_is_within_the_tolerance_of_a_much_finer_solution():
    """The accepted S is the first of 64, 128, ... whose estimated error (check(S) over 2^p - 1, p
    the order observed between the last two checks) is at most 1% of the smallest mean error
    measured; independent truth: the reference x_2S is within that 1% of a 16x finer solution, and
    S / 2 did not meet the rule."""
    ckpt = mixture()
    ev, _ = evaluator(ckpt, range(6), None)
    errors = [float(ev.errors(quad(ev, n), "unipc", 3, "bh2").mean()) for n in (6, 16, 40)]
    info = ev.reference_info
    assert info["rule_met"] and info["smallest_error"] == pytest.approx(min(errors), rel=1e-9)
    S = ev.reference_steps // 2
    assert info["steps"] == 2 * S and info["check"] == f"RMS difference to {S} steps" and S > 64

    def solution(steps):
        return ev._to_zero(ev._solve(ev.x_T, ev._uniform(steps), *REF_SOLVER))

    x_half, x_S, x_2S = solution(S // 2), solution(S), solution(2 * S)
    check = float(rms_per_sample(x_S, x_2S).mean())
    assert torch.equal(x_2S, ev.reference) and check == pytest.approx(info["check_error"], rel=1e-12)
    before = float(rms_per_sample(x_half, x_S).mean())
    assert estimated_error(check, before)[0] == pytest.approx(info["estimated_error"], rel=1e-12)
    assert info["estimated_error"] <= REF_TOLERANCE * min(errors)
    assert estimated_error(before, None)[0] > REF_TOLERANCE * min(errors) or \
        estimated_error(before, float(rms_per_sample(solution(S // 4), x_half).mean()))[0] > REF_TOLERANCE * min(errors)
    truth = float(rms_per_sample(ev.reference, solution(16 * S)).mean())
    assert truth <= REF_TOLERANCE * min(errors)
    assert truth <= 2 * info["estimated_error"]  # the estimate is of the right size, not only an upper bound


def test_the_estimate_takes_the_observed_order_at_most_two():
    assert estimated_error(1e-4, None) == (1e-4, 1.0)  # one check: no order known, the check itself
    assert estimated_error(1e-4, 1.5e-4) == (1e-4, 1.0)  # fell by less than 2x: no better than first order
    value, p = estimated_error(1e-4, 2.8e-4)
    assert p == pytest.approx(np.log2(2.8)) and value == pytest.approx(1e-4 / 1.8)
    assert estimated_error(1e-4, 1e-1) == pytest.approx((1e-4 / 3, 2.0))  # capped at order 2


def test_the_numerical_reference_matches_the_exact_ode_solution():
    """A two-component mixture whose second weight is 0 is a single Gaussian solved numerically:
    its reference is within check_error (and 1% of the error measured) of the closed form."""
    s = get_schedule("vp-linear")
    mu = torch.full((1, 16), 0.3, dtype=torch.float64)
    two = mixture_checkpoint(GaussianMixture(torch.cat([mu, -mu]), 0.2, weights=[1.0, 0.0],
                                             sample_shape=(1, 4, 4)), s)
    ev, _ = evaluator(two, range(8), None)
    error = float(ev.errors(quad(ev, 8), "unipc", 3, "bh2").mean())
    exact = GaussianMixture(mu, 0.2, sample_shape=(1, 4, 4)).ode_solution(
        ev.x_T, float(s.alpha(ev.T)), float(s.sigma(ev.T)), float(s.alpha(ev.eps)), float(s.sigma(ev.eps)))
    gap = float(rms_per_sample(ev.reference, ev._to_zero(exact.to(ev.x_T.dtype))).mean())
    assert ev.reference_info["rule_met"] and gap <= ev.reference_info["estimated_error"] * 2
    assert gap <= REF_TOLERANCE * error


def test_ref_steps_sets_the_first_s_and_is_bounded():
    ckpt = mixture()
    ev, counted = evaluator(ckpt, range(2), None, ref_steps=32)
    assert ev.reference_steps == 64 and sum(counted.batches) == 2 * (32 + 64 + 2)
    with pytest.raises(BadInput, match="^ref_steps must be between 32 and 100000, got 31$"):
        evaluator(ckpt, range(2), None, ref_steps=31)


# --- a network ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    import diffusers
    from tiny import save_pipeline, tiny_unet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_pipeline(tmp_path_factory.mktemp("unet") / "m", tiny_unet(),
                             diffusers.DDPMScheduler(beta_schedule="linear"))


@pytest.mark.filterwarnings("ignore")
def test_a_unet_reference_is_read_back_and_changed_weights_are_not(unet_folder, tmp_path):
    ckpt = load_checkpoint(unet_folder)
    first, counted = evaluator(ckpt, range(2), ReferenceCache(tmp_path), ref_steps=32)
    assert sum(counted.batches) == 2 * (32 + 64 + 2)
    import shutil

    moved = shutil.copytree(unet_folder, tmp_path / "elsewhere")
    again = load_checkpoint(moved)  # loaded anew from another folder: the same weights, the same key
    cache = ReferenceCache(tmp_path)
    second, counted = evaluator(again, range(2), cache, ref_steps=32)
    assert counted.batches == [2, 2] and cache.hits == 4  # only the calls to sigma 0 and torch.equal(second.reference, first.reference)
    with torch.no_grad():
        next(again.model.parameters()).view(-1)[0] += 1e-3  # one weight of one parameter
    cache = ReferenceCache(tmp_path)
    third, counted = evaluator(again, range(2), cache, ref_steps=32)
    assert cache.hits == 0 and sum(counted.batches) == 2 * (32 + 64 + 2)
    assert third.rule.stored.entries[None].key != second.rule.stored.entries[None].key
    assert not torch.equal(third.reference, second.reference)


# --- the command line -----------------------------------------------------------------------------

def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=600)


def test_evaluate_reports_the_cache_and_reuses_it(tmp_path):
    means = torch.tensor(np.random.default_rng(2).uniform(-1, 1, size=(3, 16)))
    save_mixture(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), tmp_path / "mix.yaml", schedule="vp-linear")
    args = ["evaluate", "-c", str(tmp_path / "mix.yaml"), "--nfe", "6,10", "--samples", "4", "--baselines", "quad,edm"]
    cache = tmp_path / "cache"
    default = {"DMSTEPS_CACHE": str(tmp_path / "default")}
    first = run(*args, "--cache", str(cache), env=default)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    solved = report["reference"]["steps"].bit_length() - 6  # 64, 128, ..., the reference's step count
    note = [line for line in first.stderr.splitlines() if line.startswith("reference cache")]
    assert note == [f"reference cache {cache}: 0 solutions read, {4 * solved} computed; {4 * solved + 1} files, "
                    f"{note[0].split('files, ')[1]}"] and note[0].endswith(" MB on disk")
    second = run(*args, "--cache", str(cache), env=default)
    assert second.returncode == 0, second.stderr
    assert f"reference cache {cache}: {4 * solved} solutions read, 0 computed;" in second.stderr
    assert second.stdout == first.stdout
    plain = run(*args, "--cache", str(tmp_path / "unused"), "--no-cache", env=default)
    assert plain.returncode == 0, plain.stderr
    assert "reference cache" not in plain.stderr and plain.stdout == first.stdout
    assert not (tmp_path / "unused").exists() and not (tmp_path / "default").exists()
    by_default = run(*args, env=default)  # $DMSTEPS_CACHE
    assert f"reference cache {tmp_path / 'default'}: 0 solutions read" in by_default.stderr
    bad = run(*args, "--cache", str(tmp_path / "mix.yaml"))
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: --cache {tmp_path / 'mix.yaml'}: exists and is not a folder"


def test_refine_reuses_the_references_of_both_sets_of_noises(tmp_path):
    from dmsteps_cli import StepConfig, dumps, make_table
    from dmsteps_cli.refine import RefineRequest, refine

    means = torch.tensor(np.random.default_rng(3).uniform(-1, 1, size=(3, 16)))
    save_mixture(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), tmp_path / "mix.yaml", schedule="vp-linear")
    table = tmp_path / "t.json"
    table.write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(6,)), get_schedule("vp-linear")), "json"))
    tables, caches = [], []
    for _ in range(2):
        caches.append(ReferenceCache(tmp_path / "cache"))
        tables.append(refine(RefineRequest(checkpoint=str(tmp_path / "mix.yaml"), table=str(table), train=3, holdout=4,
                                           maxiter=2, cache=caches[-1])))
    assert caches[0].hits == 0 and caches[0].misses > 0 and caches[1].misses == 0
    assert caches[1].hits == caches[0].misses  # training and held-out noises, every S
    assert dumps(tables[1], "json") == dumps(tables[0], "json")
    assert tables[0]["refine"]["reference"]["rule_met"]


def test_the_reference_grows_past_one_stalled_doubling():
    """A plateau in check(S) (one doubling that does not lower it) does not stop the reference; two
    in a row do (rule_met False). check(S) is scripted here: S -> value."""
    rule = ReferenceRule.__new__(ReferenceRule)
    script = {64: 1e-3, 128: 1.1e-3, 256: 1e-5, 512: 2e-5, 1024: 3e-5, 2048: 1e-6}

    def use(steps):
        rule.check_steps, rule.reference_steps, rule.check_error = steps, 2 * steps, script[steps]
        rule.checks[steps] = script[steps]

    rule.use, rule.checks, rule.smallest, rule.exhausted, rule.stalls = use, {}, None, False, 0
    rule.use(64)
    assert rule.require(0.01) and rule.check_steps == 256 and not rule.exhausted  # 128 stalled, 256 met the rule
    assert rule.require(1e-4) and rule.check_steps == 1024 and rule.exhausted  # 512 and 1024 stalled: stop
