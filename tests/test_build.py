"""The build: what build_info reports, and the errors of a missing or mismatched _C."""
import importlib
import types

import pytest
import torch

import iwae_ext
from iwae_ext import _extension


def test_build_info_reports_what_was_compiled():
    info = iwae_ext.build_info()
    assert info["version"] == iwae_ext.__version__
    assert info["torch"] == torch.__version__
    assert info["built_with_torch"] == torch.__version__.split("+")[0]
    for name in iwae_ext.ops.OP_NAMES:
        assert "CPU" in info["ops"][f"iwae_ext::{name}"]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"iwae_ext::{name}", "CPU")
    assert isinstance(info["openmp"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_arch_list"], "CUDA kernels were built, so an arch list was used"
        for name in iwae_ext.ops.OP_NAMES:
            assert "CUDA" in info["ops"][f"iwae_ext::{name}"]


def test_the_package_namespace():
    """samplers, plots and report are attributes (loaded on first use); no stray modules."""
    for name in ("re", "torch", "importlib"):
        assert not hasattr(iwae_ext, name), name
    assert iwae_ext.samplers.ais is importlib.import_module("iwae_ext.samplers").ais
    assert callable(iwae_ext.plots.manifold) and callable(iwae_ext.report.write_report)
    assert {"samplers", "plots"} <= set(dir(iwae_ext))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        iwae_ext.nope  # noqa: B018
    for name in iwae_ext.__all__:
        assert hasattr(iwae_ext, name), name


def test_missing_extension_says_how_to_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match="is missing.*pip install --no-build-isolation -e ."):
        _extension.load()


def test_extension_that_fails_to_load_names_torch(monkeypatch):
    def broken(name):
        raise ImportError("_C.so: undefined symbol: _ZN3c10...")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="another torch.*Rebuild it with"):
        _extension.load()


def test_extension_built_against_other_torch_is_refused(monkeypatch):
    fake = types.SimpleNamespace(built_with_torch="1.0.0")
    monkeypatch.setattr(importlib, "import_module", lambda name: fake)
    with pytest.raises(ImportError, match="built against torch 1.0.0.*Rebuild it with"):
        _extension.load()
