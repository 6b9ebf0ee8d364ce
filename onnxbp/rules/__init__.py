"""The built-in rules, one module per op family, listed explicitly.

Importing a module registers its rules through the ``@register_gradient``
decorators next to them.
"""

from . import elementwise, linalg, shape  # noqa: F401
