"""Draws the README's RoPE figures beside this script: rope_wavelengths.png (each pair's wavelength under every
scaling variant) and rope_decay.png (RoFormer's long-term decay bound).

    python assets/plot_rope.py              # writes assets/rope_wavelengths.png and assets/rope_decay.png
    python assets/plot_rope.py --out DIR    # or into DIR

Reading the wavelength figure: a pair's stretch λ'/λ of 1 means it is extrapolated (unchanged), s means
interpolated like PI, anything between a blend. Dynamic NTK is drawn at n = s·L; LongRoPE is not drawn (its
factors are searched per model). The bottom panel is at the GPU config's scale (head size 64, L = 256), where
YaRN's default betas interpolate almost every pair and YaRN is nearly PI. Reading the decay figure: a larger
base decays later and more slowly, which is why long-context models raise it.
"""

import argparse
import math
import os
import sys

import matplotlib
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for rope

from rope import default_frequencies, rope_frequencies


def plot_wavelengths(path: str, factor: float = 4.0) -> None:
    """Each pair's wavelength under every variant (head size 128, L = 4096, s = 4), and the wavelength ratio λ'/λ at
    that scale and at ropegpt's GPU scale (head size 64, L = 256)."""
    import matplotlib.pyplot as plt

    def variants(L: int) -> dict:
        return {
            "default": None,
            "linear (PI)": {"rope_type": "linear", "factor": factor},
            "ntk": {"rope_type": "ntk", "factor": factor},
            f"dynamic NTK at n = {factor:g}·L": {
                "rope_type": "dynamic",
                "factor": factor,
                "original_max_position_embeddings": L,
            },
            "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L},
            "llama3 (low 1, high 4)": {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": L,
            },
        }

    def wavelengths(rot_dim: int, L: int) -> dict:
        out = {}
        for name, scaling in variants(L).items():
            inv_freq, _ = rope_frequencies(rot_dim, 10000.0, scaling, seq_len=int(factor * L))
            out[name] = (2 * math.pi / inv_freq).numpy()
        return out

    styles = ["-", "--", "-.", ":", "-", "--"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 13), constrained_layout=True)
    big = wavelengths(128, 4096)
    for (name, lam), style in zip(big.items(), styles):
        axes[0].plot(lam, style, lw=2, label=name)
        axes[1].plot(lam / big["default"], style, lw=2, label=name)
    small = wavelengths(64, 256)
    for (name, lam), style in zip(small.items(), styles):
        axes[2].plot(lam / small["default"], style, lw=2, label=name)
    for length, label in ((4096, "L = 4096"), (factor * 4096, f"{factor:g}·L")):
        axes[0].axhline(length, color="grey", lw=1, ls="--")
        axes[0].text(0, length * 1.25, label, color="grey")
    axes[0].set(
        yscale="log",
        ylabel="wavelength λ'_i = 2π/θ'_i (tokens)",
        title=f"Wavelength of each pair, head dim 128, base 10000, L = 4096, s = {factor:g}",
    )
    for ax, title in (
        (axes[1], f"Stretch λ'/λ, head dim 128, L = 4096: 1 extrapolates, {factor:g} interpolates"),
        (axes[2], "The same at ropegpt's GPU scale, head dim 64, L = 256: YaRN is nearly PI"),
    ):
        ax.axhline(1, color="grey", lw=1)
        ax.axhline(factor, color="grey", lw=1)
        ax.text(0, 0.93, "extrapolated (unchanged)", color="grey", va="top")
        ax.text(0, factor * 0.93, f"interpolated (×{factor:g})", color="grey", va="top")
        ax.set(yscale="log", ylim=(0.75, 20), ylabel="stretch λ'_i / λ_i", title=title)
        ax.set_yticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    for ax in axes:
        ax.set_xlabel("pair i (0 = highest frequency)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=9)
    axes[1].legend(loc="upper left", fontsize=9, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decay_bound(distance: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
    """RoFormer's long-term decay (Su et al. 2021, §3.4.3): for q·k = Re Σ_i h_i e^{i(m−n)θ_i},
    |q·k| ≤ max_i |h_{i+1} − h_i| · Σ_j |S_j| with S_j = Σ_{k<j} e^{i(m−n)θ_k}; returns the relative bound
    (1/(d/2)) · Σ_{j=1}^{d/2} |S_j| (d = rot_dim) at each relative distance m − n, in float64."""
    inv_freq, _ = default_frequencies(rot_dim, base)
    angles = distance.double().unsqueeze(-1) * inv_freq  # (N, d/2)
    partial_sums = torch.polar(torch.ones_like(angles), angles).cumsum(-1)  # S_1 .. S_{d/2}
    return partial_sums.abs().mean(-1)


def plot_decay(path: str, rot_dim: int = 128) -> None:
    """The RoFormer decay bound against relative distance for a few bases: at every distance up to 512 (the paper's
    view), and averaged over log-spaced windows up to 10^6 (the trend)."""
    import matplotlib.pyplot as plt

    bases = (100.0, 1e4, 5e5, 1e7)
    fig, (near, far) = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True)
    distance = torch.arange(513)
    edges = torch.logspace(0, 6, 61)
    window = torch.linspace(0, 1, 64)
    samples = (edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * window).round()  # (60, 64)
    for base in bases:
        near.plot(distance.numpy(), decay_bound(distance, rot_dim, base).numpy(), lw=1.2, label=f"base {base:g}")
        mean = decay_bound(samples.flatten(), rot_dim, base).view(samples.shape).mean(-1)
        centres = edges[:-1].sqrt().mul(edges[1:].sqrt()).numpy()
        far.plot(centres, mean.numpy(), lw=2, marker=".", label=f"base {base:g}")
    near.set(
        xlabel="relative distance m − n (tokens)",
        ylabel="relative upper bound (1/(d/2))·Σ_j |S_j|",
        title=f"Every distance up to 512 (as in RoFormer's Figure 2), head dim {rot_dim}",
    )
    far.set(
        xscale="log",
        xlabel="relative distance m − n (tokens)",
        ylabel="mean over a log-spaced window",
        title="The trend up to 10^6: a larger base decays later and slower",
    )
    for ax in (near, far):
        ax.set_ylim(0, (rot_dim // 2 + 1) / 2 * 1.05)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("RoPE's long-term decay: the RoFormer bound on |q·k| (§3.4.3)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw RoPE's figures (rope_wavelengths.png, rope_decay.png).")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="folder for the figures (default: beside this script, assets/)",
    )
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # files only, no display
    os.makedirs(args.out, exist_ok=True)
    for name, draw in (("rope_wavelengths.png", plot_wavelengths), ("rope_decay.png", plot_decay)):
        draw(os.path.join(args.out, name))
        print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
