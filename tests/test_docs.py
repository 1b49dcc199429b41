"""Every code snippet of the README and of the documentation (docs/*.rst) runs under test.

Python snippets run in a fresh namespace in a temporary directory: as written, or (the quickstart's
30-epoch training) with the sizes shrunk by substitutions listed here, each of which must match,
so an edited snippet fails here until this test follows it. Every ``iwae-train`` / ``iwae-eval``
command line in a shell snippet parses with the command's own parser, and every Python snippet is
claimed by exactly one test below."""
import ast
import math
import os
import re
import shlex
import textwrap

import pytest
import torch

import iwae_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".rst"))


def _blocks(language):
    """(page, code) of every snippet in that language, README (fenced) and docs (code-block)."""
    found = []
    for page in PAGES:
        text = open(page).read()
        if page.endswith(".md"):
            found += [(page, b) for b in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)]
            continue
        for m in re.finditer(rf"^\.\. code-block:: {language}\n\n((?:(?:   .*)?\n)+)", text, flags=re.M):
            found.append((page, textwrap.dedent(m.group(1)).strip("\n") + "\n"))
    return found


def _one(fragment):
    found = [code for _, code in _blocks("python") if fragment in code]
    assert len(found) >= 1, f"no snippet with {fragment!r}"
    assert all(code == found[0] for code in found), f"snippets with {fragment!r} differ between pages"
    return found[0]


CLAIMS = ("iwae_ext.build_info()", 'iwae_ext.train(model="iwae", k=5, epochs=30',
          "from iwae_ext.ops import logmeanexp", "samplers.ais(", "class MyVAE",
          "part = evaluate.bounds(", "class IWAEPlusELBO", "class Narrow",
          "EventAccumulator(", "adapters.from_pythae(trained)", "adapters.from_pyro(model, guide",
          "encoder_net=encoder, decoder_net=decoder, out=")


def test_every_python_snippet_is_claimed_by_a_test():
    blocks = _blocks("python")
    assert len(blocks) >= 7
    for page, code in blocks:
        claims = [c for c in CLAIMS if c in code]
        assert len(claims) == 1, f"{os.path.relpath(page, ROOT)}: a snippet no test (or two) runs:\n{code}"


def test_build_info_sample_is_current():
    code = _one("iwae_ext.build_info()")
    shown = ast.literal_eval(code.split("\n", 1)[1])
    info = iwae_ext.build_info()
    assert set(shown) == set(info)
    assert set(shown["ops"]) == set(info["ops"])
    if not info["cuda_kernels"]:
        assert shown["ops"] == info["ops"]
    assert shown["version"] == info["version"]


def test_logmeanexp_snippet_runs_as_written(capsys):
    ns = {}
    exec(_one("from iwae_ext.ops import logmeanexp"), ns)
    g = ns["log_weights"].grad
    torch.testing.assert_close(g.sum(0), torch.full((20,), 1 / 20))  # softmax over k, mean over batch
    assert "torch.Size([20])" in capsys.readouterr().out


def test_samplers_snippet_runs_as_written_and_finds_log_z(capsys):
    torch.manual_seed(0)
    ns = {}
    exec(_one("samplers.ais("), ns)
    est, exact = (float(v) for v in capsys.readouterr().out.split())
    se = float(iwae_ext.evaluate.log_mean_exp_stderr(ns["res"].log_weights))
    assert abs(est - exact) < 4 * se + 0.01, (est, exact, se)
    assert exact == pytest.approx(math.log(2 * math.pi * 0.25))
    assert ns["hmc"].samples.shape == (100, 256, 2)


def test_quickstart_snippet_runs_with_its_sizes_shrunk(tmp_path, monkeypatch, capsys):
    code = _one('iwae_ext.train(model="iwae", k=5, epochs=30')
    for old, new in (('epochs=30, out="runs/iwae-k5"',
                      'epochs=1, out="runs/iwae-k5", subset=200, eval_k=10, train_eval_size=50, progress=False'),
                     ('.split("test")', '.split("test")[:50]'),
                     ("k=5000)", "k=10)")):
        assert old in code, f"the quickstart changed: {old!r} is not in it"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(code, ns)
    assert ns["metrics"]["epochs"] == 1 and ns["ll"].shape == (50,) and bool((ns["ll"] < 0).all())
    assert "L_5000 = -" in capsys.readouterr().out


def test_your_own_model_snippet_runs_as_written():
    torch.manual_seed(0)
    ns = {}
    exec(_one("class MyVAE"), ns)
    assert isinstance(ns["model"], iwae_ext.LatentVariableModel)
    assert ns["ll"].shape == (10,) and ns["ais"].shape == (10,)
    assert bool(torch.isfinite(ns["ll"]).all() and torch.isfinite(ns["ais"]).all())


def test_weight_diagnostics_snippet_prints_what_the_docs_show(capsys):
    ns = {}
    exec(_one("class Narrow"), ns)
    printed = capsys.readouterr().out.strip().splitlines()
    text = open(os.path.join(DOCS, "evaluating.rst")).read()
    shown = re.search(r"It prints \(root mean squares over the 100 images\)::\n\n((?:   .*\n)+)", text).group(1)
    assert printed == [line.strip() for line in shown.splitlines()]  # seeded: the same digits


def test_tensorboard_snippet_logs_each_epoch(capsys, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    monkeypatch.chdir(tmp_path)
    exec(_one("EventAccumulator("), {})
    shown = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert [step for step, _ in shown] == [1, 2] and all(-600 < bound < -50 for _, bound in shown)


def test_pythae_snippet_evaluates_a_pythae_model(capsys):
    pytest.importorskip("pythae", reason="pythae is not installed (pip install iwae_ext[pythae])")
    ns = {}
    exec(_one("adapters.from_pythae(trained)"), ns)
    assert ns["model"].fused and torch.isfinite(ns["b"].log_likelihood).all() and ns["b"].khat.shape == (20,)
    assert capsys.readouterr().out.startswith("pythae IWAE: L_1000 = ")


def test_pyro_snippet_evaluates_a_pyro_model(capsys):
    pytest.importorskip("pyro", reason="Pyro is not installed (pip install iwae_ext[pyro])")
    import pyro
    pyro.clear_param_store()
    ns = {}
    exec(_one("adapters.from_pyro(model, guide"), ns)
    assert ns["wrapped"].fused and ns["wrapped"].vectorized
    assert torch.isfinite(ns["b"].log_likelihood).all() and torch.isfinite(ns["ais"]).all()
    assert capsys.readouterr().out.startswith("Pyro VAE: L_1000 = ")


def test_own_networks_snippet_trains_and_reloads(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(_one("encoder_net=encoder, decoder_net=decoder, out="), ns)
    assert isinstance(ns["model"], iwae_ext.models.NetworkVAE)
    assert ns["metrics"]["config"]["networks"]["encoder"] == "torch.nn.modules.container.Sequential"
    assert capsys.readouterr().out.startswith("convolutional IWAE: test L_100 = ")


def test_per_image_streams_snippet_runs_alone(capsys):
    ns = {}
    exec(_one("part = evaluate.bounds("), ns)  # self-contained: its own imports and model
    printed = capsys.readouterr().out
    assert printed.startswith("relative difference ")
    assert float(printed.split()[2]) < 1e-6  # the same draws with other batch mates: rounding only


def test_new_model_kind_snippet_trains_without_touching_the_loop(tmp_path, monkeypatch):
    from iwae_ext.trainer import KINDS
    monkeypatch.chdir(tmp_path)
    ns = {}
    try:
        exec(_one("class IWAEPlusELBO"), ns)
        assert KINDS["iwae_plus_elbo"] is ns["IWAEPlusELBO"]
        assert ns["metrics"]["epochs"] == 1 and math.isfinite(ns["metrics"]["test_log_likelihood"])
        assert ns["metrics"]["config"]["model"] == "iwae_plus_elbo"
    finally:
        KINDS.pop("iwae_plus_elbo", None)


def _command_lines():
    """Every iwae-train / iwae-eval invocation in a shell snippet, as argv after the command."""
    found = []
    for page, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#!") else ""
            if not line:
                continue
            words = shlex.split(line)
            for i, w in enumerate(words):
                if w in ("iwae-train", "iwae_ext.cli.train") or (w == "iwae_ext.train" and words[i - 1] == "-m"):
                    found.append((page, "train", words[i + 1:]))
                elif w in ("iwae-eval", "iwae_ext.cli.eval"):
                    found.append((page, "eval", words[i + 1:]))
    return found


def test_every_command_line_in_the_docs_parses():
    from iwae_ext.cli import eval as cli_eval
    from iwae_ext.cli import train as cli_train
    lines = _command_lines()
    assert len(lines) >= 15, len(lines)
    for page, which, argv in lines:
        argv = [a for a in argv if a not in ("...", "[--resume]")]
        argv = [os.environ.get(a[1:], "x") if a.startswith("$") else a for a in argv]
        parser = cli_train.parser() if which == "train" else cli_eval.parser()
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{os.path.relpath(page, ROOT)}: iwae-{which} {' '.join(argv)} does not parse ({e})")


def test_every_paper003_command_in_the_docs_parses():
    """``benchmarks/reproduce.py paper003 ...`` lines: known experiments, flags its parser takes."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import paper003
    names = set(paper003.experiments()) | {"list"}
    seen = 0
    for page, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#", 1)[0])
            if "benchmarks/reproduce.py" in words and words[words.index("benchmarks/reproduce.py") + 1] == "paper003":
                argv = [os.environ.get(a[1:], "0") if a.startswith("$") else a
                        for a in words[words.index("benchmarks/reproduce.py") + 2:]]
                try:
                    a = paper003.parser().parse_args(argv)
                except SystemExit as e:
                    pytest.fail(f"{os.path.relpath(page, ROOT)}: {line.strip()} does not parse ({e})")
                assert a.experiment in names, f"{os.path.relpath(page, ROOT)}: unknown experiment in {line.strip()}"
                seen += 1
    assert seen >= 7, seen
