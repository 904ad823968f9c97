"""The paper's downstream classifier (Sect. 5.4, Fig. 10; SPEC section 5).

Input: per sample, the K = n_blocks + 1 per-layer means of the frozen encoder (the input
embedding x0 and every block output, each averaged over valid observations), shape (K, D).
``GammaWeighting`` mixes them with softmax(γ) (γ trainable, initialised to 1/K) and divides the
weighted sum by K, as the authors' code does. An MLP 1024-512-256 (ReLU), a LayerNorm and a linear
layer give the class logits. With K = 1 (a single embedding, or hand-crafted features) the
weighting is the identity, so baselines go through exactly the same network.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


class GammaWeighting(nn.Module):
    """``sum_k softmax(γ)_k · x_k / K`` over the layer axis of (B, K, D) inputs."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = int(n_layers)
        self.gamma = nn.Parameter(torch.full((self.n_layers,), 1.0 / self.n_layers))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.gamma, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.n_layers:
            raise ValueError(f"expected (B, {self.n_layers}, D) inputs, got {tuple(x.shape)}")
        return (self.weights()[None, :, None] * x).sum(1) / self.n_layers


class EmbeddingClassifier(nn.Module):
    """γ-weighting (when K > 1), Dense 1024-512-256 ReLU, LayerNorm, Dense(n_classes).

    ``mean``/``std`` (buffers, shape (K, D)) standardise the inputs first; they stay 0/1 (no-op)
    unless the trainer is asked to standardise (hand-crafted features need it: their scales
    differ by orders of magnitude; the encoder's layer means are used raw, as in the paper)."""

    def __init__(self, n_layers: int, d_in: int, n_classes: int, hidden=(1024, 512, 256)):
        super().__init__()
        self.n_layers, self.d_in, self.n_classes = int(n_layers), int(d_in), int(n_classes)
        self.gamma = GammaWeighting(n_layers)
        layers, width = [], d_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers += [nn.LayerNorm(width), nn.Linear(width, n_classes)]
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(n_layers, d_in))
        self.register_buffer("std", torch.ones(n_layers, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], self.n_layers, self.d_in)
        x = (x - self.mean) / self.std
        return self.mlp(self.gamma(x))


@dataclass
class ClassifierSettings:
    """Training of the classifier head. The paper gives the architecture but not these values;
    they are ours: Adam, early stopping on the validation loss with the best weights restored
    (training loss when there is no validation set).

    ``standardize``: z-score every input channel with the training set's mean and std (per layer
    and channel) before the γ weighting. On by default, a departure from the paper, which feeds
    the layer means raw: across samples they vary by ~1-5% of their common offset (measured on
    the released Astromer 1 weights), and an MLP on the raw means learns that signal too slowly
    for a few-label budget, while hand-crafted features differ in scale by orders of magnitude.
    ``threads``: CPU threads while training (this network is small: more threads mostly add
    contention on a busy machine); None leaves torch's setting."""

    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    standardize: bool = True
    device: str | None = None
    threads: int | None = 1


@dataclass
class TrainedClassifier:
    """A fitted classifier: ``predict``/``predict_proba`` on (N, K, D) or (N, K*D) arrays."""

    model: EmbeddingClassifier
    classes: np.ndarray
    history: list = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0

    @torch.no_grad()
    def predict_proba(self, x, batch_size: int = 4096) -> np.ndarray:
        self.model.eval()
        dev = next(self.model.parameters()).device
        x = _as_3d(x, self.model.n_layers)
        out = [torch.softmax(self.model(torch.from_numpy(x[s:s + batch_size]).to(dev)), -1).cpu()
               for s in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, x) -> np.ndarray:
        return self.classes[self.predict_proba(x).argmax(1)]

    def gamma_weights(self) -> np.ndarray:
        """softmax(γ): the learned weight of each layer (x0, block 1, ..., block n)."""
        return self.model.gamma.weights().detach().cpu().numpy()


def _as_3d(x, n_layers: int | None = None) -> np.ndarray:
    x = np.array(x, dtype=np.float32)  # a writable copy: torch.from_numpy shares it
    if x.ndim == 2:
        k = n_layers or 1
        if x.shape[1] % k:
            raise ValueError(f"{x.shape[1]} features do not split into {k} layers")
        x = x.reshape(len(x), k, x.shape[1] // k)
    if x.ndim != 3:
        raise ValueError(f"expected (N, K, D) or (N, F) inputs, got shape {x.shape}")
    return np.ascontiguousarray(x)


def fit_classifier(x, y, x_val=None, y_val=None, *, classes=None,
                   settings: ClassifierSettings | None = None,
                   n_layers: int | None = None) -> TrainedClassifier:
    """Train an :class:`EmbeddingClassifier` on ``x`` (N, K, D) (or (N, F) with ``n_layers``)
    and labels ``y``. ``classes`` fixes the label order (default: sorted unique of ``y``)."""
    s = settings or ClassifierSettings()
    x = _as_3d(x, n_layers)
    y = np.asarray(y)
    classes = np.unique(y) if classes is None else np.asarray(classes)
    lookup = {c: i for i, c in enumerate(classes.tolist())}
    unknown = sorted(set(y.tolist()) - set(lookup))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {classes.tolist()}")
    yi = np.array([lookup[v] for v in y.tolist()], dtype=np.int64)
    has_val = x_val is not None and len(x_val) > 0
    if has_val:
        x_val = _as_3d(x_val, x.shape[1])
        yv = np.array([lookup[v] for v in np.asarray(y_val).tolist()], dtype=np.int64)

    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(int(s.seed))
    torch.manual_seed(int(s.seed))
    model = EmbeddingClassifier(x.shape[1], x.shape[2], len(classes))
    if s.standardize:
        mu = x.mean(0)
        sd = x.std(0)
        model.mean.copy_(torch.from_numpy(mu))
        # A constant feature must not blow up: its standardised value is 0 whatever the scale.
        model.std.copy_(torch.from_numpy(np.where(sd > 1e-12, sd, 1.0)))
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(yi).to(device)
    if has_val:
        xv, yvt = torch.from_numpy(x_val).to(device), torch.from_numpy(yv).to(device)

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if s.threads and device.type == "cpu":
        torch.set_num_threads(int(s.threads))
    try:
        best_state, best_epoch, history = _train_loop(model, opt, loss_fn, xt, yt,
                                                      (xv, yvt) if has_val else None, s, gen,
                                                      device)
    finally:
        torch.set_num_threads(threads)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainedClassifier(model, classes, history, best_epoch, time.perf_counter() - t0)


def _train_loop(model, opt, loss_fn, xt, yt, val, s, gen, device):
    best, best_state, best_epoch, bad = np.inf, None, 0, 0
    history = []
    n = len(xt)
    for epoch in range(1, s.max_epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for b in range(0, n, s.batch_size):
            idx = perm[b:b + s.batch_size]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        row = {"epoch": epoch, "train_loss": total / n}
        if val is not None:
            model.eval()
            with torch.no_grad():
                logits = model(val[0])
                row["val_loss"] = float(loss_fn(logits, val[1]))
                row["val_acc"] = float((logits.argmax(1) == val[1]).float().mean())
        history.append(row)
        monitored = row.get("val_loss", row["train_loss"])
        if monitored < best - 1e-6:
            best, best_epoch, bad = monitored, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= s.patience:
                break
    return best_state, best_epoch, history
