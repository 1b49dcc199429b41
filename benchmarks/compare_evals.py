"""Two models' per-image evaluations, compared image by image.

    python benchmarks/compare_evals.py EVAL_A EVAL_B [--names A B] [--json OUT]

EVAL_A and EVAL_B are ``iwae-eval ... --out DIR`` directories of the same images (the same
``--limit`` and ``--seed``): their ``<split>-L<k>.rank*.jsonl`` and, with ``--ais``,
``<split>-ais.rank*.jsonl`` files. Prints and writes, for each estimator both have, each model's
mean and B - A with its paired standard error over the images (the images' own variation
cancels), and the variational gap (AIS log-likelihood - L_k) of each with its standard error.
"""
import argparse
import glob
import json
import math
import os


def _rows(directory, pattern):
    rows = {}
    for path in sorted(glob.glob(os.path.join(directory, pattern))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[r["index"]] = r
    return rows


def _mean_se(values):
    n = len(values)
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return m, math.sqrt(var / n)


def compare(a_dir, b_dir):
    rows = {side: {name: _rows(d, pattern) for name, pattern in (("L_k", "*-L*.rank*.jsonl"),
                                                                 ("ais", "*-ais.rank*.jsonl"))}
            for side, d in (("a", a_dir), ("b", b_dir))}
    out = {}
    for name in ("L_k", "ais"):
        a, b = rows["a"][name], rows["b"][name]
        if not a or not b:
            continue
        if set(a) != set(b):
            raise SystemExit(f"compare_evals: {name}: the two evaluations cover different images "
                             f"({len(a)} and {len(b)}; use the same --limit and --seed)")
        idx = sorted(a)
        va = [a[i]["log_likelihood"] for i in idx]
        vb = [b[i]["log_likelihood"] for i in idx]
        out[name] = {"n": len(idx), "a": _mean_se(va), "b": _mean_se(vb),
                     "b_minus_a": _mean_se([y - x for x, y in zip(va, vb)])}
    if "ais" in out and "L_k" in out:
        for side in ("a", "b"):
            lk, ais = rows[side]["L_k"], rows[side]["ais"]
            out[f"gap_{side}"] = _mean_se([ais[i]["log_likelihood"] - lk[i]["log_likelihood"] for i in sorted(ais)])
            out[f"ais_{side}"] = {"acceptance_rate": _mean_se([ais[i]["acceptance_rate"] for i in ais])[0],
                                  "step_size": _mean_se([ais[i]["step_size"] for i in ais])[0]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--names", nargs=2, default=["A", "B"])
    p.add_argument("--json", help="write the comparison here")
    args = p.parse_args(argv)
    out = compare(args.a, args.b)
    a, b = args.names
    for name in ("L_k", "ais"):
        if name in out:
            r = out[name]
            print(f"{name:4s} on {r['n']} images: {a} {r['a'][0]:.2f} +- {r['a'][1]:.2f}, {b} {r['b'][0]:.2f} "
                  f"+- {r['b'][1]:.2f}; {b} - {a} = {r['b_minus_a'][0]:+.3f} +- {r['b_minus_a'][1]:.3f} (paired)")
    for side, label in (("a", a), ("b", b)):
        if f"gap_{side}" in out:
            g = out[f"gap_{side}"]
            print(f"variational gap (AIS - L_k) of {label}: {g[0]:.3f} +- {g[1]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"names": args.names, "a": args.a, "b": args.b, **out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
