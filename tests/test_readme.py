"""Every Python snippet of the README runs: the build_info sample matches this build's keys and
ops, the cheap snippets run as written, and the quickstart's training snippet runs with its sizes
shrunk (the substitutions are listed here, and each must match, so an edited README fails here
until this test follows it)."""
import ast
import math
import os
import re

import pytest
import torch

import iwae_ext

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def _block(fragment):
    found = [b for b in _python_blocks() if fragment in b]
    assert len(found) == 1, f"one README snippet with {fragment!r}, found {len(found)}"
    return found[0]


def test_every_python_snippet_is_covered_here():
    covered = ("iwae_ext.build_info()", "iwae_ext.train(", "from iwae_ext.ops import logmeanexp",
               "samplers.ais(", "class MyVAE", "part = evaluate.bounds(", "class IWAEPlusELBO")
    for block in _python_blocks():
        assert any(c in block for c in covered), f"a README snippet no test runs:\n{block}"


def test_build_info_sample_is_current():
    block = _block("iwae_ext.build_info()")
    shown = ast.literal_eval(block.split("\n", 1)[1])
    info = iwae_ext.build_info()
    assert set(shown) == set(info)
    assert set(shown["ops"]) == set(info["ops"])
    if not info["cuda_kernels"]:
        assert shown["ops"] == info["ops"]
    assert shown["version"] == info["version"]


def test_logmeanexp_snippet_runs_as_written():
    ns = {}
    exec(_block("from iwae_ext.ops import logmeanexp"), ns)
    g = ns["log_weights"].grad
    torch.testing.assert_close(g.sum(0), torch.full((20,), 1 / 20))  # softmax over k, mean over batch


def test_samplers_snippet_runs_as_written_and_finds_log_z(capsys):
    torch.manual_seed(0)
    ns = {}
    exec(_block("samplers.ais("), ns)
    est, exact = (float(v) for v in capsys.readouterr().out.split())
    se = float(iwae_ext.evaluate.log_mean_exp_stderr(ns["res"].log_weights))
    assert abs(est - exact) < 4 * se + 0.01, (est, exact, se)
    assert exact == pytest.approx(math.log(2 * math.pi * 0.25))
    assert ns["hmc"].samples.shape == (100, 256, 2)


def test_quickstart_snippet_runs_with_its_sizes_shrunk(tmp_path, monkeypatch):
    code = _block('iwae_ext.train(model="iwae", k=5')
    for old, new in (('epochs=30, out="runs/iwae-k5"',
                      'epochs=1, out="runs/iwae-k5", subset=200, eval_k=10, train_eval_size=50, progress=False'),
                     ('.split("test")', '.split("test")[:50]'),
                     ("k=5000)", "k=10)")):
        assert old in code, f"the README's quickstart changed: {old!r} is not in it"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(code, ns)
    assert ns["metrics"]["epochs"] == 1 and ns["ll"].shape == (50,) and bool((ns["ll"] < 0).all())


def test_your_own_model_snippet_runs_as_written():
    torch.manual_seed(0)
    ns = {}
    exec(_block("class MyVAE"), ns)
    assert isinstance(ns["model"], iwae_ext.LatentVariableModel)
    assert ns["ll"].shape == (10,) and ns["ais"].shape == (10,)
    assert bool(torch.isfinite(ns["ll"]).all() and torch.isfinite(ns["ais"]).all())


def test_per_image_streams_snippet_runs_after_the_model_snippet(capsys):
    ns = {}
    exec(_block("class MyVAE"), ns)
    exec(_block("part = evaluate.bounds("), ns)
    printed = float(capsys.readouterr().out.strip().replace("tensor(", "").split(",")[0].rstrip(")"))
    assert printed < 1e-5  # the same images with other batch mates: float32 rounding only


def test_new_model_kind_snippet_trains_without_touching_the_loop():
    from iwae_ext.trainer import KINDS
    ns = {}
    try:
        exec(_block("class IWAEPlusELBO"), ns)
        assert KINDS["iwae_plus_elbo"] is ns["IWAEPlusELBO"]
        assert ns["metrics"]["epochs"] == 1 and math.isfinite(ns["metrics"]["test_log_likelihood"])
        assert ns["metrics"]["config"]["model"] == "iwae_plus_elbo"
    finally:
        KINDS.pop("iwae_plus_elbo", None)
