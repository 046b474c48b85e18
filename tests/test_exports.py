"""Every export read back with its consumer's own parsing rule gives the table's numbers.

- ComfyUI's ManualSigmas (comfy_extras/nodes_custom_sampler.py) finds the numbers of its text with
  ``re.findall(r"[-+]?(?:\\d*\\.*\\d+)", text)``, reads each with ``float`` and makes a float32 tensor;
  the pattern has no exponent, so ``1e-05`` would read as 1 and -5.
- stable-diffusion.cpp's ``--sigmas`` (examples/common/common.cpp) drops a leading ``[`` and a trailing
  ``]``, splits at commas, trims white space, skips empty items, reads each with ``std::stof``
  (float32) and runs len - 1 steps.

The numbers are plain decimals (no exponent) that read back as the same float64; the ends of a list are
the table's own: T and eps for EDM and flow tables (80 and 0.002, not 79.99999999999997 and
0.0020000000000000005), kappa(T) and kappa(eps) for VP tables.
"""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dmsteps_cli import StepConfig, dumps, make_table
from dmsteps_cli.check import DERIVED_RTOL
from dmsteps_cli.cli import app, main
from dmsteps_cli.integrations.exports import decimal, decimals, sdcpp_sigmas, sigmas_for
from dmsteps_cli.schedules import schedule_from_spec
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import bundled_tables

MANUAL_SIGMAS = re.compile(r"[-+]?(?:\d*\.*\d+)")  # ComfyUI's ManualSigmas pattern, verbatim
NOISE_AT_THE_END = re.compile(r"(?:9{8,}|0{8,})\d{1,2}$")  # 79.99999999999997, 0.0020000000000000005
TABLES = {name: load_table(path) for name, path in bundled_tables().items()}


def manual_sigmas(text: str) -> list[float]:
    """What ComfyUI's ManualSigmas reads of ``text`` (before its float32 tensor)."""
    return [float(v) for v in MANUAL_SIGMAS.findall(text)]


def sdcpp(text: str) -> list[float]:
    """What stable-diffusion.cpp's ``--sigmas`` reads of ``text``: float32 values."""
    text = text.removeprefix("[").removesuffix("]")
    return [float(np.float32(item.strip())) for item in text.split(",") if item.strip()]


def f32(values) -> list[float]:
    return np.asarray(values, dtype=np.float32).tolist()


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e30, allow_nan=False, allow_infinity=False))
def test_a_decimal_reads_back_as_the_same_float_by_every_rule(x):
    text = decimal(x)
    assert "e" not in text.lower()
    assert manual_sigmas(text) == [x] and float(text) == x and sdcpp(text) == f32([x])


def test_small_and_large_numbers_have_no_exponent():
    assert [decimal(v) for v in (1e-05, 2.5e-7, 1e16, 80.0, 0.002, 0.0)] == [
        "0.00001", "0.00000025", "10000000000000000", "80.0", "0.002", "0.0"]
    assert manual_sigmas(repr(1e-05)) == [1.0, -5.0]  # why: the plain repr would read as two numbers


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_ready_made_list_parses_back_as_the_table(name):
    table = TABLES[name]
    spec = table["schedule"]
    schedule = schedule_from_spec(spec)
    cfg = table["config"]
    for entry in table["entries"]:
        for final_sigma in ("table", "zero"):
            values = sigmas_for(entry, final_sigma, schedule=spec)
            text = decimals(values)
            assert "e" not in text.lower() and " " not in text
            assert manual_sigmas(text) == values and [float(v) for v in text.split(",")] == values
            assert sdcpp(text) == f32(values) and len(sdcpp(text)) - 1 == entry["nfe"]
            first, last = text.split(",")[0], text.split(",")[-1]
            assert not NOISE_AT_THE_END.search(first) and not NOISE_AT_THE_END.search(last), (first, last)
        plain = sigmas_for(entry, schedule=spec)
        if spec["family"] in ("edm", "flow"):  # the sigmas are the times: the config's T and eps, exactly
            assert (plain[0], plain[-1]) == (cfg["T"], cfg["eps"])
        else:  # kappa(T) and kappa(eps), computed when the table was made: the promise is DERIVED_RTOL
            ends = [float(schedule.sampler_sigma(t)) for t in (cfg["T"], cfg["eps"])]
            np.testing.assert_allclose([plain[0], plain[-1]], ends, rtol=DERIVED_RTOL, atol=0)
        np.testing.assert_allclose(plain, entry["sigmas"], rtol=1e-13)  # the recorded sigmas, to rounding


def test_edm_ends_are_exactly_its_sigma_max_and_min():
    table = TABLES["edm-dpmpp-o2"]
    entry = table["entries"][0]
    assert entry["sigmas"][0] != 80.0 and entry["sigmas"][-1] != 0.002  # exp(log t) rounds
    text = decimals(sigmas_for(entry, schedule=table["schedule"]))
    assert text.startswith("80.0,") and text.endswith(",0.002")


def test_sdcpp_string_ends_in_0_and_sets_the_step_count():
    table = TABLES["sd-dpmpp-o2"]
    entry = next(e for e in table["entries"] if e["nfe"] == 10)
    text = sdcpp_sigmas(entry, schedule=table["schedule"])
    assert text.endswith(",0.0") and len(sdcpp(text)) - 1 == entry["nfe"] == 10
    assert sdcpp(f"[{text}]") == sdcpp(text.replace(",", ", "))  # brackets and spaces are read the same
    assert sdcpp_sigmas(entry, final_sigma="table").endswith(",0.029167158151720367")
    assert sigmas_for(entry, final_sigma="zero", comfy_unipc=True)[-1] == 0.001


def run(*args):
    return CliRunner().invoke(app, list(args))


def test_show_prints_plain_decimals_with_the_end_asked_for(tmp_path, capsys):
    path = tmp_path / "tiny-eps.json"  # a continuous VP table ending at eps = 1e-5
    path.write_text(dumps(make_table(StepConfig(schedule="vp-linear", eps=1e-5, nfe=(5,))), "json"))
    r = run("show", str(path), "--nfe", "5", "--as", "t")
    assert r.exit_code == 0 and r.stdout.strip().endswith(",0.00001") and "e" not in r.stdout
    edm = run("show", "edm-unipc-o3", "--nfe", "5", "--as", "sigmas").stdout.strip()
    assert edm.startswith("80.0,") and edm.endswith(",0.002")
    assert run("show", "edm-unipc-o3", "--nfe", "5", "--as", "sigmas", "--final-sigma", "table").stdout.strip() == edm
    zero = run("show", "edm-unipc-o3", "--nfe", "5", "--as", "sigmas", "--final-sigma", "zero").stdout.strip()
    assert zero.split(",")[:-1] == edm.split(",")[:-1] and zero.endswith(",0.0")
    for args, message in ((("--as", "t", "--final-sigma", "zero"), "--final-sigma applies only to --as sigmas"),
                          (("--as", "sigmas", "--final-sigma", "0"), "--final-sigma '0': choose from table, zero")):
        with pytest.raises(SystemExit) as stop:
            main(["show", "edm-unipc-o3", "--nfe", "5", *args])
        assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
