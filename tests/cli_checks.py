"""Checks shared by the tests that run the real CLI in a subprocess."""


def refused(r, *needles):
    """Exit 2, one error line naming every needle, no traceback, nothing on stdout; the line."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    assert r.stdout == ""
    return lines[0]
