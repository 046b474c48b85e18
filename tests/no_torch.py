"""A Python program (for ``python -c``) that runs the dmsteps CLI as on a machine without torch:
every import of torch raises ImportError, and the program fails if torch got into ``sys.modules``
anyway. It exits with the CLI's own status; the CLI's arguments follow it on the command line."""

CLI_WITHOUT_TORCH = """
import importlib.abc, runpy, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch on this machine")
        return None

sys.meta_path.insert(0, NoTorch())
try:
    runpy.run_module("dmsteps_cli", run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""
