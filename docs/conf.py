"""Sphinx configuration of the iwae_ext documentation.

Build (strict: every warning, broken link or unresolved reference fails):
    pip install sphinx
    sphinx-build -n -W --keep-going -b html docs docs/_build/html
"""
import iwae_ext

project = "iwae_ext"
author = "the iwae_ext authors"
copyright = "2026, the iwae_ext authors"
release = iwae_ext.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "Fused C++/CUDA ops for importance-weighted generative models",
                      "page_width": "1180px", "sidebar_width": "230px"}
html_static_path = []
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # not torch.nn.Module.forward's
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = True
# types of other packages (no intersphinx: the build runs offline) and typing aliases
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|typing|collections|dataclasses|argparse|os|Tensor|nn)(\..*)?"),
    (r"py:class", r"(optional|callable|Callable|Sequence|Iterable|Path|array|tensor|module|dtype|device|Generator)"),
    (r"py:class", r".*\.Tensor"),
]
