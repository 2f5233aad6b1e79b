"""Data: dataset registry, seeded splits, world-size-invariant sampling, batched views."""
from .datasets import (
    DATASETS,
    DatasetNotFoundError,
    EmptyDatasetError,
    ImageDataset,
    ImageDecodeError,
    TensorImageDataset,
    UnknownDatasetError,
    build_dataset,
    register_dataset,
)
from .sampler import GlobalBatchSampler, IndexedBatch, SamplerSource, loader
from .splits import derive_seed, make_splits, splits_for, train_test_split_indices
from .views import ViewConfig, apply_params, make_views, mild_view_config, sample_params

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "GlobalBatchSampler",
    "ImageDataset",
    "ImageDecodeError",
    "IndexedBatch",
    "SamplerSource",
    "TensorImageDataset",
    "UnknownDatasetError",
    "ViewConfig",
    "apply_params",
    "build_dataset",
    "derive_seed",
    "loader",
    "make_splits",
    "splits_for",
    "make_views",
    "mild_view_config",
    "register_dataset",
    "sample_params",
    "train_test_split_indices",
]
