"""The compiled core stands alone: it imports without torch and reports its CPU path."""

import subprocess
import sys


def test_compiled_module_imports_without_torch():
    # Block torch entirely; bspf_ext._C must still load (it does not link libtorch).
    code = (
        "import sys, importlib.util, pathlib\n"
        "sys.modules['torch'] = None\n"
        "spec = importlib.util.find_spec('bspf_ext')\n"
        "folder = pathlib.Path(spec.submodule_search_locations[0])\n"
        "path = next(folder.glob('_C*.so'))\n"
        "module_spec = importlib.util.spec_from_file_location('bspf_ext._C', path)\n"
        "module = importlib.util.module_from_spec(module_spec)\n"
        "module_spec.loader.exec_module(module)\n"
        "print(module.capability())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"scalar", "avx2"}
