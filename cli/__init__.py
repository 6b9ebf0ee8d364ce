"""onnxbp's command-line front end (installed as the ``onnxbp_cli`` package and the ``onnxbp`` command).

Thin: it parses arguments, calls the onnxbp library, and prints errors as one line.
"""
