"""``python -m onnxbp``: hands over to the ``onnxbp`` command (the top-level ``cli`` package).

Only run, never imported by the library: the CLI depends on onnxbp, not the
reverse, so the import happens inside :func:`main`.

``cli`` is the package beside ``onnxbp`` (in a checkout and in site-packages
alike).  ``python -m`` puts the current directory first on ``sys.path``, so a
``cli`` module of the user's own project could shadow it; the folder that
holds this ``onnxbp`` goes first instead.
"""

import sys
from pathlib import Path


def main(argv=None) -> int:
    home = str(Path(__file__).resolve().parent.parent)
    if sys.path[:1] != [home]:
        sys.path.insert(0, home)
    cached = sys.modules.get("cli")
    if cached is not None and not str(getattr(cached, "__file__", "")).startswith(home):
        del sys.modules["cli"]
    from cli.main import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
