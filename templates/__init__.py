"""runphi's platform templates (``<board>.toml``), installed as the package ``runphi.templates``.

This file makes the directory a regular package: setuptools' editable install cannot map a
namespace package nested in ``runphi``, and :func:`runphi.config.shipped_templates_dir` finds
the templates by importing this package, in an editable install as in a wheel.
"""
