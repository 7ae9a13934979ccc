"""Collapse diagnostics for unified towers (Sequential Collapse Propagation, TokenFormer §3).

On a held-out batch, per layer:

* singular-value spectrum and effective rank ``exp(−Σ p_i log p_i)``, ``p = σ / Σσ``, of the
  sequence-token states (every real behaviour token of the batch, one row each);
* mutual information (nats) between K-means clusters of each row's mean sequence-token state and
  the first label, for K ∈ {8, 16, 32};
* attention mass that sequence queries put on field tokens (0 once fields are dropped).

Everything here is single-device and read-only: it runs a model, it never trains one.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import mutual_info_score

from model.attention import causal_mask
from model.ranking import TOKENFORMER_TOWERS


def effective_rank(states_ND: torch.Tensor) -> tuple[float, np.ndarray]:
    s = torch.linalg.svdvals(states_ND.double())
    p = s / s.sum().clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum()
    return float(torch.exp(entropy)), s.numpy()


def cluster_mutual_information(rows_BD: np.ndarray, labels_B: np.ndarray, ks=(8, 16, 32), seed: int = 0) -> dict:
    out = {}
    for k in ks:
        if len(rows_BD) <= k:
            continue
        clusters = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(rows_BD)
        out[f"mi_k{k}"] = float(mutual_info_score(labels_B.astype(int), clusters))
    return out


def _field_attention_mass(block, num_prefix: int, seq_slice: slice) -> float | None:
    cap = block.captured
    if not cap or num_prefix == 0:
        return None
    q, k, valid = cap["q"], cap["k"], cap["key_valid"]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = causal_mask(valid, block.window)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # B H S S
    seq_probs = probs[:, :, seq_slice]  # sequence queries
    mass = seq_probs[..., : num_prefix - 1].sum(-1)  # field (and dense) tokens, not the <sep>
    q_valid = valid[:, seq_slice][:, None, :].expand_as(mass)
    return float(mass[q_valid].mean())


# towers with per-layer sequence states (``has_layer_states`` of their models): the TokenFormer
# family and HyFormer; ``analyze`` applies to them
LAYER_TOWERS = TOKENFORMER_TOWERS + ("hyformer",)


def plot_training_curve(history: dict[str, list[tuple[int, float]]], path) -> None:
    """Training metrics against the step (``name → [(step, value)]``), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, pts in history.items() if pts]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*sorted(history[name]))
        ax.plot(steps, values, marker=".")
        ax.set(title=name, xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def has_layer_states(model) -> bool:
    """Whether ``analyze`` applies to the model's tower: the TokenFormer family (tokenformer,
    naive_transformer, hstu) and HyFormer — not RankMixer + LONGER, whose ``layers`` mix tokens
    but expose no per-layer sequence states."""
    from model.hyformer import HyFormerTower
    from model.tokenformer import TokenFormer

    return isinstance(model.tower, (TokenFormer, HyFormerTower))


@torch.no_grad()
def analyze(model, batch, ks=(8, 16, 32)) -> dict:
    """Run ``model`` (a RankingModel with a TokenFormer-family tower) on ``batch``; per-layer
    effective rank, spectrum, cluster MI and field-attention mass."""
    tower = model.tower
    if not has_layer_states(model):
        raise ValueError(f"diagnostics need a tower with per-layer sequence states (TokenFormer family, "
                         f"HyFormer), got {type(tower).__name__}")
    if not hasattr(tower, "layers"):  # HyFormer: per-layer sequence states H_l
        return _analyze_states(model, batch, ks)
    model.eval()
    for layer in tower.layers:
        layer.captured = {}
    try:
        sparse = model.sparse_arch(batch.fields, batch.sequences)
        _, states = tower(batch.dense, sparse, return_states=True)
        captured_layers = [dict(layer.captured) for layer in tower.layers]
    finally:
        for layer in tower.layers:
            layer.captured = None
    labels = batch.labels[:, 0].numpy()
    L = states[0][0].shape[1]
    out = {"layers": []}
    prefix = tower.num_prefix_tokens
    dropped = False
    for i, ((x_BLD, valid_BL), cap) in enumerate(zip(states, captured_layers)):
        if tower.cfg.drop_field_tokens and i == tower.cfg.num_full_layers and i > 0:
            dropped = True
        tokens = x_BLD[valid_BL]
        erank, spectrum = effective_rank(tokens)
        rows = (x_BLD * valid_BL[..., None]).sum(1) / valid_BL.sum(1, keepdim=True).clamp(min=1)
        layer = {"layer": i, "window": tower.layers[i].window, "effective_rank": erank,
                 "spectrum": spectrum.tolist(), **cluster_mutual_information(rows.numpy(), labels, ks)}
        tower.layers[i].captured = cap
        mass = None if dropped else _field_attention_mass(tower.layers[i], prefix, slice(prefix, prefix + L))
        tower.layers[i].captured = None
        layer["field_attention_mass"] = 0.0 if dropped else mass
        out["layers"].append(layer)
    return out


@torch.no_grad()
def _analyze_states(model, batch, ks) -> dict:
    """Effective rank, spectrum and cluster MI of each layer's sequence-token states; no softmax
    over field tokens here, so no field-attention mass."""
    model.eval()
    sparse = model.sparse_arch(batch.fields, batch.sequences)
    _, states = model.tower(batch.dense, sparse, return_states=True)
    labels = batch.labels[:, 0].numpy()
    out = {"layers": []}
    for i, (x_BLD, valid_BL) in enumerate(states):
        erank, spectrum = effective_rank(x_BLD[valid_BL])
        rows = (x_BLD * valid_BL[..., None]).sum(1) / valid_BL.sum(1, keepdim=True).clamp(min=1)
        out["layers"].append({"layer": i, "window": None, "effective_rank": erank,
                              "spectrum": spectrum.tolist(), "field_attention_mass": None,
                              **cluster_mutual_information(rows.numpy(), labels, ks)})
    return out


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, rep in report.items():
        layers = rep["layers"]
        axes[0].plot([x["effective_rank"] for x in layers], marker="o", label=name)
        axes[1].plot([x.get("mi_k16", np.nan) for x in layers], marker="o", label=name)
        last = np.array(layers[-1]["spectrum"])
        axes[2].semilogy(last / last.max(), label=f"{name} (last layer)")
    axes[0].set(title="effective rank of sequence-token states", xlabel="layer")
    axes[1].set(title="MI(K-means K=16, label) [nats]", xlabel="layer")
    axes[2].set(title="normalized singular values", xlabel="index")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
