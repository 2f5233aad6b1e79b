"""Typed config sections: each stage has one root dataclass whose fields are the YAML sections.

Loading (YAML file, dotted overrides, one-line errors naming the key and the valid ones) is in
:mod:`dist_awenc.config_loading`; ``load_config``, ``to_yaml`` and ``to_dict`` are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dist_awenc.config_checks import (check_optim, check_robust, check_scales, check_shadow, check_specific,
                                      check_train)
from dist_awenc.config_loading import load_config, to_dict, to_yaml  # noqa: F401  (re-exported)
from dist_awenc.data.views import ViewConfig, mild_view_config

# ----------------------------------------------------------------- sections


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0


@dataclass
class DataSection:
    name: str = "digits"
    root: Optional[str] = None
    image_size: int = 16
    size: Optional[int] = None  # number of samples, for `fake`
    split_seed: int = 0
    # fractions of the dataset for pre-training / the owner's hold-out / the pirate's downstream task, cut from one
    # permutation seeded by split_seed; a 0 leaves that split empty ([1, 0, 0]: all for pre-training; [0, 0, 1]:
    # a downstream task on another dataset or folder)
    splits: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.3])
    num_workers: int = 0
    loader: str = "torch"  # torch | ffcv | auto (ffcv when installed and data.beton is set)
    beton: Optional[str] = None  # .beton of this stage's split (awenc data write-beton)
    # where JPEG files are decoded with views.crop=decode and the torch loader: cpu (the workers, PIL) or device
    # (the workers read the bytes and the boxes, the training device decodes: nvjpeg on a GPU)
    decode: str = "cpu"
    # an image file PIL cannot decode (truncated, corrupt): skip (its sample is replaced by the split's next readable
    # image, the file logged and counted in the run's metrics) | refuse (every file of the split decoded at start,
    # the first bad one named); PNG, CMYK and grayscale files in a JPEG folder are decoded either way
    bad_files: str = "skip"


@dataclass
class EncoderSection:
    arch: str = "tiny"
    width: Optional[int] = None  # tiny nets only (None: the net's default, 32); an error for a net without a width
    norm: str = "group"  # group | batch | none
    stem: Optional[str] = None  # ResNets/ConvNeXt: cifar | imagenet (None: cifar); ViTs: patch<N>; an error for a net without one
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    proj_hidden_dim: int = 256
    proj_dim: int = 64
    head_norm: str = "none"  # none | batch
    proj_out_norm: str = "none"  # none | batch: BatchNorm (scale, no shift) on the projector's output (SimCLR v1)
    proj_layers: int = 2  # 2 | 3: Linear layers of the projector (3: MoCo v3's)
    freeze_patch_embed: bool = False  # ViTs: the patch embedding stays at its random init, untrained (MoCo v3)


@dataclass
class SSLSection:
    method: str = "simclr"  # simclr | moco_v2 | byol
    temperature: Optional[float] = None  # None: the method's default
    queue_size: int = 4096
    momentum: float = 0.99
    pred_hidden_dim: int = 256
    symmetric: bool = True  # moco_v2 only: false is the paper's one-direction loss (q of view 1, k of view 2)
    loss_reduction: str = "mean"  # mean | sum of a symmetrised loss's two directions (sum: BYOL's, SimCLR's code)


@dataclass
class OptimSection:
    name: str = "adamw"  # adamw | sgd | lars
    lr: float = 2e-3  # lr_scaling none: the lr; linear / sqrt: the lr at 256 images a step (engine/plan.py)
    lr_scaling: str = "none"  # none | linear (x B/256) | sqrt (x sqrt(B/256)); B = train.batch_size x grad_accum
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    warmup_epochs: Optional[float] = None  # epochs of this stage's split, rounded to steps
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_optim(self)


@dataclass
class TrainSection:
    epochs: int = 10
    max_steps: Optional[int] = None  # caps the schedule length
    batch_size: int = 256  # global batch, split over processes
    grad_accum: int = 1
    # grad_accum > 1 is refused where a method's batch is the micro-batch (SimCLR's and MoCo v3's negatives, MoCo
    # v2's queue, BatchNorm statistics, SyncBN's too) unless this says the micro-batch semantics are meant
    grad_accum_ok: bool = False
    mixed_precision: Optional[str] = None  # None: from the launcher; no | bf16 | fp16
    checkpoint_every: Optional[int] = None  # steps; None with checkpoint_every_epochs None: 200 steps
    checkpoint_every_epochs: Optional[float] = None  # or in epochs, rounded to steps (set one of the two)
    keep_checkpoints: int = 2
    log_every: int = 10
    trackers: list[str] = field(default_factory=list)  # tensorboard, wandb
    progress: bool = True
    channels_last: bool = False
    compile: bool = False  # torch.compile (inductor)
    sync_bn: bool = False  # SyncBatchNorm across processes (GPUs only)
    deepspeed: Optional[str] = None  # a DeepSpeed JSON (configs/deepspeed/): ZeRO through Accelerate's plugin

    def __post_init__(self) -> None:
        check_train(self)


@dataclass
class ProbeSection:
    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    knn_k: int = 20
    test_fraction: float = 0.3


@dataclass
class PretrainConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    views: ViewConfig = field(default_factory=ViewConfig)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    ssl: SSLSection = field(default_factory=SSLSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)


@dataclass
class SuspectCardSection:
    """A bare weights file's architecture and input conventions, where no card is beside it (a torchvision or timm
    ResNet state dict: docs/in-the-wild.md). Where a card exists, a field set here must agree."""

    arch: Optional[str] = None  # resnet18 | resnet34 | resnet50 (torchvision names) | timm/<timm model> | tiny | ...
    stem: Optional[str] = None  # cifar (3x3, no max-pool) | imagenet (7x7 + max-pool) | patch<N> (ViT); None: from the weights
    input_size: Optional[int] = None  # pixels (square)
    mean: Optional[list[float]] = None  # None: ImageNet's [0.485, 0.456, 0.406]
    std: Optional[list[float]] = None  # None: ImageNet's [0.229, 0.224, 0.225]


@dataclass
class DownstreamConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="downstream"))
    encoder: str = ""  # encoder file or run folder
    suspect_card: SuspectCardSection = field(default_factory=SuspectCardSection)  # when it is a bare weights file
    data: DataSection = field(default_factory=DataSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    classes: int = 0  # the pirate's task: the dataset's labels mod `classes` (digits at 2: even vs odd); 0 = its own


@dataclass
class GenerationSection:
    """Stage 1 (METHOD.md): universal perturbation by projected gradient steps."""

    eps: float = 16 / 255
    alpha: float = 1.0
    steps: int = 300
    step_size: float = 1 / 255
    optimizer: str = "pgd"  # pgd (sign gradient) | adam
    batch_size: int = 128
    key: str = "image"  # image (from the owner's pool) | noise


@dataclass
class RobustSection:
    """Transform robustness (METHOD.md, "Robust embedding"): marked images pass a random differentiable transform
    before the encoder in stage 1 and in stage 2's watermark terms. ``transforms`` empty (the default): off."""

    transforms: list[str] = field(default_factory=list)  # of jpeg, resize, crop, noise, blur
    jpeg_quality: list[int] = field(default_factory=lambda: [50, 95])
    resize_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_area: list[float] = field(default_factory=lambda: [0.8, 1.0])
    noise_std: list[float] = field(default_factory=lambda: [0.0, 0.03])
    blur_sigma: list[float] = field(default_factory=lambda: [0.0, 1.0])
    p_identity: float = 0.2  # probability that an image is left as it is

    def __post_init__(self) -> None:
        check_robust(self)


@dataclass
class RehearsalSection:
    """Derivative robustness (METHOD.md, "Robust embedding"): stage 1 also fits surrogate derivatives of f0 and keeps
    reference encoders unmoved (dist_awenc/watermark/rehearsal.py). Both empty (the default): off."""

    surrogates: list[str] = field(default_factory=list)  # attack:strength applied to f0 on the owner's data
    references: int = 0  # independent encoders pre-trained like f0 (seeds 7000 + r)
    reference_weight: float = 1.0
    # more architectures (name[:width]) for the references, `references` encoders each, pre-trained like f0 otherwise
    reference_archs: list[str] = field(default_factory=list)


@dataclass
class PlanSection:
    """The verification plan fixed with the secret and carried in its header (METHOD.md, stage 3)."""
    alpha: float = 1e-3
    n_whitebox: int = 256  # hold-out images, white-box
    n_score: int = 100  # queries, black-box score mode
    n_label: int = 100  # queries, black-box label mode
    n_collapse: int = 100  # queries, black-box label-agnostic (collapse) mode
    alternatives: int = 19  # J alternative secrets for the permutation test (smallest p 1/(J+1); 999 for 1e-3)
    twin_cosine: float = 1.0  # stage 1's twin rule, 1: off (docs/verification.md; measured, it did not help)
    primary_mode: str = "whitebox"
    primary_probabilities: str = "blackbox_score"  # the primary mode of a verifier with a model's probabilities
    primary_labels: str = "blackbox_label"  # ... with its top-1 labels only (a non-primary mode alone: exploratory)
    resize: str = "bilinear-antialias"  # how queries are resized for a suspect at another input size (verify/resize.py)
    score_statistic: str = "key_tv"  # what the probabilities' permutation test ranks (verify/permutation.py)
    whitebox_statistic: str = "score"  # ... the weights' (WHITEBOX_STATISTICS there)
    label_statistic: str = "key_hits_shift"  # ... the labels' (LABEL_STATISTICS there)


@dataclass
class WatermarkConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="watermark"))
    encoder: str = ""  # the clean encoder f0: file or run folder
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    plan: PlanSection = field(default_factory=PlanSection)
    robust: RobustSection = field(default_factory=RobustSection)
    rehearsal: RehearsalSection = field(default_factory=RehearsalSection)


@dataclass
class EmbedLossSection:
    """Stage 2 weights (METHOD.md)."""
    lambda_cl: float = 1.0
    lambda_wm: float = 1.0
    lambda_dev: float = 0.5
    lambda_key: float = 1.0
    lambda_keep: float = 1.0
    freeze_bn: bool = True
    # input-size factors at which the wm, dev and keep terms are also taken (a pirate serving at another resolution)
    scales: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_scales(self.scales)


@dataclass
class ShadowSection:
    """Derivative robustness in stage 2 (dist_awenc/watermark/shadow.py): a shadow student distilled alongside, and
    ``weight`` x the term that makes f's clean answers teach it the watermark. ``weight`` 0 (the default): off."""

    weight: float = 0.0
    arch: str = ""  # the shadow student's architecture ('': f0's)
    refresh: int = 0  # restart the shadow from a fresh initialisation every this many steps (0: never)

    def __post_init__(self) -> None:
        check_shadow(self)


@dataclass
class SpecificSection:
    """Stage 2 holds f's response to ``secrets`` of the plan's alternatives a step (on ``images`` clean images) at
    f0's, ``weight`` x (dist_awenc/watermark/specific.py): the permutation test's power. ``weight`` 0: off.
    ``suppress`` in [0, 1] lowers that target to (1 - suppress) x f0's response: 1 holds f's response to the
    alternatives at their controls' (no effect at all)."""

    weight: float = 0.0
    secrets: int = 4
    images: int = 16
    suppress: float = 0.0

    def __post_init__(self) -> None:
        check_specific(self)


@dataclass
class EmbedConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="embed"))
    encoder: str = ""  # f0: file or pre-training run folder (its heads are reused)
    secret: str = ""  # secret file or watermark run folder
    data: DataSection = field(default_factory=DataSection)
    views: ViewConfig = field(default_factory=ViewConfig)
    mild_views: ViewConfig = field(default_factory=mild_view_config)
    ssl: SSLSection = field(default_factory=SSLSection)
    loss: EmbedLossSection = field(default_factory=EmbedLossSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-4))
    train: TrainSection = field(default_factory=lambda: TrainSection(epochs=20))
    robust: RobustSection = field(default_factory=RobustSection)
    shadow: ShadowSection = field(default_factory=ShadowSection)
    specific: SpecificSection = field(default_factory=SpecificSection)


@dataclass
class VerifySection:
    mode: str = "whitebox"  # whitebox | blackbox_score | blackbox_label | blackbox_collapse
    n: Optional[int] = None  # None: the secret's plan (256 white-box images, 100 black-box queries by default)
    alpha: Optional[float] = None  # encoder-level p at or below which ownership is claimed; None: the plan's (1e-3)
    tau_whitebox: float = 0.1
    tau_score: float = 0.1
    tau_label: float = 0.3
    tau_collapse: float = 0.3
    # label mode: the suspect task's number of classes, which picks the calibrated label threshold for it;
    # None: the largest label threshold over every calibrated class count (safe whatever the task)
    classes: Optional[int] = None
    calibration: Optional[str] = None  # calibration.json: its per-mode thresholds replace the tau_* margins
    exploratory: bool = False  # allow deviations from the secret's plan; every verdict then says it is exploratory
    endpoint: str = ""  # black-box: query a live prediction API (awenc serve) at this URL instead of loading `suspect`
    endpoint_timeout: float = 10.0
    endpoint_retries: int = 3
    endpoint_batch_size: int = 64
    adapter: str = ""  # the API's wire format: a YAML file of configs/adapters/ ("": awenc serve's, = serve.yaml)
    # score and label modes with the plan's J alternatives: the most queries their exact permutation test may send
    # beyond the margin test's (n = 100, J = 19: score 1274, label 1881; J = 999: 66,934, 98,901); over it: not run
    permutation_queries: int = 5000


@dataclass
class VerifyConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="verify"))
    suspect: str = ""  # encoder (white-box) or downstream model (black-box): file or run folder
    suspect_card: SuspectCardSection = field(default_factory=SuspectCardSection)  # white-box: a bare weights file
    secret: str = ""
    data: DataSection = field(default_factory=DataSection)
    verify: VerifySection = field(default_factory=VerifySection)


@dataclass
class DemoConfig:
    """Defaults tuned for digits at 16 px on 2 CPU cores: digits are small and
    not mirror-symmetric, so crops stay large and there is no flip."""

    run: RunSection = field(default_factory=lambda: RunSection(name="demo"))
    data: DataSection = field(default_factory=DataSection)
    views: ViewConfig = field(default_factory=lambda: ViewConfig(crop_scale_min=0.6, flip_p=0.0))
    encoder: EncoderSection = field(default_factory=EncoderSection)
    ssl: SSLSection = field(default_factory=lambda: SSLSection(temperature=0.2))
    optim: OptimSection = field(default_factory=OptimSection)
    pretrain: TrainSection = field(default_factory=lambda: TrainSection(epochs=100, batch_size=128, checkpoint_every=500))
    # batch 32 (not 128): the plan's J alternative secrets repeat stage 1 J times, and at 16 px a 32-image
    # batch gives the same verdicts at a quarter of the cost (measured: results/demo/README.md)
    generation: GenerationSection = field(default_factory=lambda: GenerationSection(batch_size=32))
    # lambda_wm = 3 rather than METHOD.md's 1: at 1 the marked queries reach cos 0.98 to the key, which a linear
    # head still tells apart (label mode missed p < 1e-3); at 3 they reach 0.996 with no utility cost here.
    loss: EmbedLossSection = field(default_factory=lambda: EmbedLossSection(lambda_wm=3.0))
    mild_views: ViewConfig = field(default_factory=mild_view_config)
    embed_optim: OptimSection = field(default_factory=lambda: OptimSection(lr=2e-3))
    embed: TrainSection = field(default_factory=lambda: TrainSection(epochs=40, batch_size=128, checkpoint_every=500))
    probe: ProbeSection = field(default_factory=ProbeSection)
    # alpha 0.05, not 1e-3: the permutation test's smallest p is 1/(J+1), and J = 19 (a minute of stage 1 here)
    # reaches 0.05; J = 999 for 1e-3 is 50x the demo's stage 1 (docs/verification.md)
    plan: PlanSection = field(default_factory=lambda: PlanSection(alpha=0.05))
    verify: VerifySection = field(default_factory=VerifySection)
    # Plain AWEncoder by default. The recipe with transforms and a shadow student (docs/robustness.md, "Embedding
    # recipes") wins at calibrated margins but loses the demo's black-box permutation verdicts (#27, measured)
    robust: RobustSection = field(default_factory=RobustSection)  # stage 1 and stage 2 alike
    shadow: ShadowSection = field(default_factory=ShadowSection)  # stage 2
    # stage 2 holds f's response to 4 alternatives a step (on 16 images) at their controls' (suppress 1): plain
    # AWEncoder's release ranked 2nd of the 20 secrets on one CPU, this ranks it 1st and decides more of the grid's
    # thefts in every access (results/permutation_grid/README.md) at 20.7% of an ImageNet pre-training (8 on 32: 30.5%);
    # weight 0 for plain AWEncoder, suppress 0 to hold them at f0's
    specific: SpecificSection = field(default_factory=lambda: SpecificSection(weight=10.0, suppress=1.0))


@dataclass
class PopulationSection:
    """The null population: encoders trained independently of the owner's, and attacked copies of them."""

    archs: list[str] = field(default_factory=lambda: ["tiny:32", "tiny_resnet:16"])  # name[:width]
    methods: list[str] = field(default_factory=lambda: ["simclr", "moco_v2", "byol"])
    norms: list[str] = field(default_factory=lambda: ["group"])
    seeds: int = 5  # independent seeds per (arch, method, norm)
    # one attacked copy of every null encoder, the attacks taken round robin ([] for none)
    attacks: list[str] = field(default_factory=lambda: ["finetune_ssl:5", "prune_global:0.5", "distill:10"])
    extra_encoders: list[str] = field(default_factory=list)  # more null encoders: files or run folders
    n_secrets: int = 3  # the owner's secret + (n_secrets - 1) generated on null encoders (not extra evidence)
    holdout_fraction: float = 0.5  # null families kept out of threshold setting, to measure the FPR
    # label mode is calibrated per number of classes too: each null encoder's downstream task regrouped into
    # this many classes (labels mod k), since the chance hit rate, and so the null's room, depends on it
    label_classes: list[int] = field(default_factory=lambda: [2, 3, 5, 10])
    owner_budget: bool = True  # null encoders train like the owner's f0 (its run's config.yaml), when found
    # where the null encoders live ("" = <run folder>/population): point another secret's calibration at an
    # existing population to reuse its pre-trained encoders (each is reused only under the same config)
    root: str = ""


@dataclass
class CalibrateConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="calibration"))
    owner_encoder: str = ""  # the owner's clean f0: not a null; measured and reported as the owner's reference
    secret: str = ""  # the owner's secret
    data: DataSection = field(default_factory=DataSection)
    population: PopulationSection = field(default_factory=PopulationSection)
    views: ViewConfig = field(default_factory=lambda: ViewConfig(crop_scale_min=0.6, flip_p=0.0))
    encoder: EncoderSection = field(default_factory=EncoderSection)
    ssl: SSLSection = field(default_factory=lambda: SSLSection(temperature=0.2, queue_size=1024))
    optim: OptimSection = field(default_factory=OptimSection)
    pretrain: TrainSection = field(default_factory=lambda: TrainSection(epochs=30, batch_size=128, checkpoint_every=1000, progress=False))
    generation: GenerationSection = field(default_factory=GenerationSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    verify: VerifySection = field(default_factory=VerifySection)
