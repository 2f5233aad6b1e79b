"""Stage: the pirate's downstream model and utility metrics (``awenc downstream``).

A downstream model is saved as ``model.safetensors`` (encoder, feature
standardisation and head weights) with a ``model.json`` card that nests the
encoder's card; black-box verification loads it as the deployed ``g``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_awenc.evaluate.serving import with_recorded_transform
from dist_awenc.config import DownstreamConfig, ProbeSection
from dist_awenc.data import build_dataset, splits_for, train_test_split_indices
from dist_awenc.data.stream import Images, IndexedImages
from dist_awenc.encoders.io import Encoder, build_encoder, read_state
from dist_awenc.encoders.thirdparty import load_suspect
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.evaluate.probe import DownstreamModel, accuracy, extract_features, knn_accuracy, train_linear_head
from dist_awenc.files import atomic_write_text, read_json, save_tensors, sha256_file
from dist_awenc.log import info
from dist_awenc.runs import open_run

MODEL_FORMAT = "dist_awenc.downstream/1"


def probe_options(probe: ProbeSection) -> dict[str, float]:
    """A ``probe:`` config section as :func:`evaluate_encoder`'s keyword arguments (for stage code)."""
    return {"epochs": probe.epochs, "lr": probe.lr, "weight_decay": probe.weight_decay, "knn_k": probe.knn_k,
            "test_fraction": probe.test_fraction}


def task_classes(num_classes: int, classes: int) -> int:
    """The number of classes of a task regrouped from a dataset's ``num_classes`` (``classes = 0``: the dataset's).

    Raises:
        ConfigError: ``classes`` outside ``[2, num_classes]`` (0 aside).
    """
    if classes == 0:
        return num_classes
    if not 2 <= classes <= num_classes:
        raise ConfigError(f"classes={classes}: a task needs 2 to {num_classes} classes (this dataset has {num_classes}), "
                          "or 0 for the dataset's own")
    return classes


def group_labels(labels: torch.Tensor, num_classes: int, classes: int) -> tuple[torch.Tensor, int]:
    """A task of ``classes`` classes made from a dataset's: label ``y`` becomes ``y mod classes``.

    Every image stays in the task (digits at 2 classes: even vs odd); ``classes = 0`` keeps the labels.
    """
    k = task_classes(num_classes, classes)
    return (labels if k == num_classes else labels % k), k


def evaluate_encoder(encoder: Encoder, images: Images, labels: torch.Tensor, num_classes: int, *, seed: int,
                     epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4, knn_k: int = 20,
                     test_fraction: float = 0.3, features: torch.Tensor | None = None
                     ) -> tuple[DownstreamModel, dict[str, float]]:
    """Train the pirate's linear head on a seeded train part; report linear-probe and kNN accuracy.

    Args:
        encoder: the (frozen) encoder.
        images, labels: (N, 3, S, S) downstream images in [0, 1] (a tensor, or an
            :class:`~dist_awenc.data.stream.IndexedImages` decoded batch by batch) and their (N,) labels.
        num_classes: number of downstream classes.
        seed: seeds the train/test split and the head's training.
        epochs, lr, weight_decay: the linear head's training.
        knn_k: neighbours of the kNN classifier.
        test_fraction: share of the images held out for both accuracies.
        features: ``extract_features(encoder, images)`` when the caller already has them (one encoder probed on
            several splits extracts them once).
    """
    tr, te = train_test_split_indices(torch.arange(len(images)), seed, test_fraction)
    feats = extract_features(encoder, images) if features is None else features
    device = next(encoder.parameters()).device  # kNN on the encoder's device (a top-k of a matmul)
    model = DownstreamModel(encoder, encoder.feature_dim, num_classes)
    train_linear_head(model, feats[tr], labels[tr], epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    metrics = {
        "linear_probe": accuracy(model, feats[te], labels[te]),
        "knn": knn_accuracy(feats[tr].to(device), labels[tr], feats[te].to(device), labels[te], k=knn_k),
        "n_train": len(tr),
        "n_test": len(te),
    }
    return model.eval(), metrics


def save_downstream(model: DownstreamModel, encoder_card: dict, num_classes: int, path: Path) -> dict:
    path = path.with_suffix(".safetensors")
    card = {"format": MODEL_FORMAT, "num_classes": num_classes, "encoder": encoder_card}
    card["sha256"] = save_tensors(path, dict(model.state_dict()), metadata={"format": MODEL_FORMAT})
    atomic_write_text(path.with_suffix(".json"), json.dumps(card, indent=2))
    return card


def load_downstream(path: str | Path) -> tuple[DownstreamModel, dict]:
    """Load a saved downstream model (file or run folder), checking its hash and architecture."""
    p = Path(path)
    p = p / "model.safetensors" if p.is_dir() else p
    if not p.exists():
        raise ArtifactError(f"'{p}' does not exist (expected a downstream model.safetensors or its run folder)")
    card_path = p.with_suffix(".json")
    card = read_json(card_path, ArtifactError, f"the card of {p.name}")
    if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
        raise ArtifactError(f"{card_path}: not a downstream model card (expected format {MODEL_FORMAT!r})")
    state = read_state(p)
    if sha256_file(p) != card.get("sha256"):
        raise ArtifactError(f"{p}: SHA-256 does not match its card")
    ec = card["encoder"]
    encoder = build_encoder(ec["arch"], ec["arch_kwargs"], ec["mean"], ec["std"], ec["input_size"])
    model = DownstreamModel(encoder, encoder.feature_dim, card["num_classes"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{p}: weights do not fit the card's architecture: {str(e).splitlines()[1].strip()}") from None
    model.encoder = with_recorded_transform(model.encoder, ec)
    return model.eval(), card


def downstream(cfg: DownstreamConfig) -> dict:
    """Evaluate an encoder on the pirate's downstream split; save the downstream model."""
    encoder, card = load_suspect(cfg.encoder, cfg.suspect_card)  # a card, or a bare weights file with suspect_card.*
    if card.get("query_transform"):  # the pirate's deployment: its serving path transforms every query
        encoder = with_recorded_transform(encoder, card)
        info(f"the downstream model applies the encoder's recorded query transform {card['query_transform']}")
    if card["input_size"] != cfg.data.image_size:
        raise ArtifactError(
            f"encoder was trained at {card['input_size']} px but data.image_size={cfg.data.image_size}; set data.image_size={card['input_size']}"
        )
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    idx = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "downstream", "downstream")["downstream"]
    task_classes(dataset.num_classes, cfg.classes)  # checked before anything is decoded
    images = IndexedImages(dataset, idx, num_workers=cfg.data.num_workers)  # decoded batch by batch by the probe
    labels, classes = group_labels(images.labels, dataset.num_classes, cfg.classes)
    with open_run(cfg, "downstream") as run_dir:
        model, metrics = evaluate_encoder(encoder, images, labels, classes, seed=cfg.run.seed,
                                          **probe_options(cfg.probe))
        save_downstream(model, card, classes, run_dir / "model")
        atomic_write_text(run_dir / "downstream.json",
                          json.dumps({"encoder_sha256": card.get("sha256"), "classes": classes, **metrics}, indent=2))
        info(f"linear probe {metrics['linear_probe']:.4f}  kNN {metrics['knn']:.4f}  -> {run_dir}")
    return metrics
