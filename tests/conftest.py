import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests (run with `pytest -m slow`)")
    config.addinivalue_line("markers", "torch: compares against torch autograd (skips without torch)")
