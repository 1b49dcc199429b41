"""Kingma and Welling (section 5 of the reproduction by Nicholson et al.): reconstruction error of a vanilla autoencoder and a VAE of the same
architecture against the latent size.

    python benchmarks/ae_vs_vae.py [--latents 2 5 10 20] [--epochs 10] [--out-dir runs/ae-vs-vae]

Both: one hidden layer of 500 tanh units in encoder and decoder (the paper's), Bernoulli decoder
means, batch 100, Adam lr 1e-3, seed 0, the bundled binarized MNIST. AE: trained on the squared
error of the decoder mean at the encoder's mean (`iwae-train --model ae`); VAE: the ELBO with the
analytic KL. Reconstruction error: the MSE per pixel of the decoder mean at the posterior mean on
the whole test split (the paper uses the mean too). JSON: benchmarks/results/ae-vs-vae.json;
figure: docs/figures/ae_vs_vae.png.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext import plots  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latents", type=int, nargs="+", default=[2, 5, 10, 20])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out-dir", default="runs/ae-vs-vae")
    p.add_argument("--json", default=os.path.join(HERE, "results", "ae-vs-vae.json"))
    p.add_argument("--figure", default=os.path.join(HERE, "..", "docs", "figures", "ae_vs_vae.png"))
    args = p.parse_args()
    rows = []
    for latent in args.latents:
        row = {"latent": latent}
        for model in ("ae", "vae"):
            m = iwae_ext.train(model=model, k=1, hidden=[[500]], latent_dim=[latent], epochs=args.epochs,
                               batch_size=100, lr=1e-3, seed=0, out=os.path.join(args.out_dir, f"{model}-{latent}"),
                               eval_k=100, train_eval_size=500, progress=False)
            if model == "vae":
                model_obj = iwae_ext.load_checkpoint(os.path.join(args.out_dir, f"{model}-{latent}"))
                x = iwae_ext.data.load_dataset().split("test")
                with torch.no_grad():
                    mse = float(iwae_ext.evaluate.squared_error(model_obj, x).mean()) / x.shape[1]
                row["vae_mse"], row["vae_test_log_likelihood"] = mse, m["test_log_likelihood"]
            else:
                row["ae_mse"] = m["test_mse"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    data = plots.reconstruction_error_figure(rows, args.figure)
    payload = {"benchmark": "ae_vs_vae", "epochs": args.epochs, "hidden": 500, "results": rows, "plotted": data}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print("saved", args.json, args.figure)


if __name__ == "__main__":
    main()
