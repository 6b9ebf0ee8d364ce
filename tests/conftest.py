import os
import sys


sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None and importlib.util.find_spec("torch") is not None:
        from gradutil import import_torchvision

        import_torchvision()  # a CUDA torchvision wheel next to CPU torch: see gradutil.import_torchvision
    config.addinivalue_line("markers", "slow: long-running tests (run with `pytest -m slow`)")
    config.addinivalue_line("markers", "torch: compares against torch autograd (skips without torch)")


def pytest_terminal_summary(terminalreporter):
    from gradutil import WORST_ERRORS

    if not WORST_ERRORS:
        return
    terminalreporter.section("worst relative error per rule family")
    for (family, kind), rel in sorted(WORST_ERRORS.items()):
        terminalreporter.write_line(f"{family:<22} {kind:<32} {rel:.3e}")
