"""The training recipe: what ``fine_tune`` (core/train.py) is told to do, and what it reports
per epoch. torch-free, so the Dagster definitions, settings and the CLI read it at load time."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STRATEGIES = ("full", "linear_probe")
# A head on fixed features tolerates (and needs) a much larger step than a whole network.
DEFAULT_LEARNING_RATE = {"full": 3e-3, "linear_probe": 1e-2}
# The recipe for a pretrained backbone (see recommended_config): a short linear-probe warm start,
# then the whole network at a lower learning rate, slowest in the backbone. Fewer epochs than
# from scratch: pretrained features need adapting, not learning.
PRETRAINED_RECIPE: dict[str, Any] = {
    "strategy": "full",
    "epochs": 8,
    "learning_rate": 1e-3,
    "probe_epochs": 5,
    "backbone_lr_factor": 0.1,
}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tuning run; defaults are calibrated on the phantom data set."""

    strategy: str = "full"
    # Tuned on the hard phantoms (core/phantoms.py VARIATIONS["hard"]), not the default set,
    # where nearly anything scores an AUC near 1: with strong augmentation the model keeps
    # improving to about 40 epochs at the embedded model's 96 px.
    epochs: int = 40
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATE[strategy]
    batch_size: int = 32
    image_size: int | None = None  # None: the base model's own preprocessing size
    seed: int = 0
    validation_fraction: float = 0.15
    early_stopping_patience: int = 10  # strongly augmented training validates noisily
    weight_decay: float = 1e-4
    augment: bool = True  # full strategy only
    # None keeps torch's default (one thread per core: fastest on an idle machine). On a shared,
    # busy machine 1 avoids OpenMP threads waiting on each other, which is often faster there.
    # Results are bit-identical for a given seed and thread count; another count changes the
    # floating-point summation order, so the weights differ slightly.
    num_threads: int | None = None
    # full strategy only: epochs of linear probing (head only, on cached embeddings) before the
    # whole network trains; 0 (the embedded model's recipe) skips the warm start.
    probe_epochs: int = 0
    # full strategy only: the backbone's learning rate as a share of the head's (1: the same).
    backbone_lr_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.epochs < 1 or self.batch_size < 2 or self.early_stopping_patience < 1:
            raise ValueError("epochs and early_stopping_patience must be >= 1, batch_size >= 2")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ValueError(
                f"validation_fraction must be in [0, 0.5), got {self.validation_fraction}"
            )
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")
        if self.probe_epochs < 0 or (self.probe_epochs and self.strategy != "full"):
            raise ValueError(
                f"probe_epochs must be >= 0 and is for the full strategy only, got "
                f"{self.probe_epochs} with strategy {self.strategy!r}"
            )
        if not 0.0 < self.backbone_lr_factor <= 1.0:
            raise ValueError(f"backbone_lr_factor must be in (0, 1], got {self.backbone_lr_factor}")

    @property
    def lr(self) -> float:
        """The learning rate actually used."""
        return (
            self.learning_rate
            if self.learning_rate is not None
            else DEFAULT_LEARNING_RATE[self.strategy]
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "learning_rate": self.lr}


def recommended_config(pretrained: bool, **overrides: Any) -> TrainConfig:
    """The training recipe that fits the base model, with ``overrides`` (TrainConfig fields) on
    top: TrainConfig's defaults for the embedded model (random weights, trained from scratch),
    PRETRAINED_RECIPE for a checkpoint (BaseModel.pretrained). The pretrained recipe is one of
    full fine-tuning: an override that picks another strategy starts from TrainConfig's
    defaults for it instead (a linear probe wants its own learning rate, and no warm start)."""
    recipe = PRETRAINED_RECIPE if pretrained else {}
    if overrides.get("strategy", recipe.get("strategy")) != recipe.get("strategy"):
        recipe = {}
    return TrainConfig(**{**recipe, **overrides})


def recipe_description(name: str) -> str:
    """What an unset ``name`` becomes under each recipe, for help texts: "15 from scratch, 8 for
    a pretrained base"."""
    scratch = getattr(TrainConfig(), name)
    pretrained = PRETRAINED_RECIPE.get(name, scratch)
    if name == "learning_rate":
        scratch = DEFAULT_LEARNING_RATE[TrainConfig().strategy]
    return (
        f"{scratch:g} from scratch, {pretrained:g} for a pretrained base"
        if not isinstance(scratch, str)
        else f"`{scratch}` from scratch, `{pretrained}` for a pretrained base"
    )


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch: mean train loss and, when there is a validation slice, its loss/AUC/accuracy."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_auc: float | None
    val_accuracy: float | None
    seconds: float


@dataclass(frozen=True)
class Augmentation:
    """The random changes ``augment_batch`` makes to each training image.

    Tuned on the hard phantoms (core/phantoms.py VARIATIONS["hard"]), which vary the way scans
    from several scanners do: the ranges cover a little more than that variation, so a model
    learns what a lesion looks like rather than the pose, contrast or shading of its scans.
    """

    hflip: float = 0.5  # probability of a left-right flip
    vflip: float = 0.5  # probability of a front-back flip
    max_rotation: float = 25.0  # degrees either way
    scale: tuple[float, float] = (0.85, 1.15)
    max_shift: float = 0.08  # as a share of the half-width
    gamma: tuple[float, float] = (0.65, 1.5)  # contrast curve on the 0..1 intensities, log-uniform
    gain: tuple[float, float] = (0.8, 1.2)
    bias: float = 0.25  # std of a linear log-gain ramp across the image (coil shading)
