"""onnxbp's command-line front end: the ``onnxbp`` command and ``python -m onnxbp``.

The same package, ``cli``, in a checkout and once installed.  Thin: it
parses arguments, calls the onnxbp library, and prints errors as one line.  It
depends on the library; the library never imports it (``onnxbp/__main__.py``
hands over to :func:`cli.main.main` only when run).
"""
