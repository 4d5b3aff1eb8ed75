"""The study's inputs: data (with preprocessing and augmentation) and the model."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from raycf.config.fields import StrictModel, names_as_text, resource_field
from raycf.models.architectures import (
    VGG_TINY,
    accepted_names,
    family_of,
    refused_names,
)


class AugmentConfig(StrictModel):
    """Training-time augmentation (METHOD §1: shift 0.2, rotation 15°, shear 0.2, zoom 0.2)."""

    rotation: float = Field(15.0, ge=0, le=180, description="max rotation in degrees")
    shift: float = Field(0.2, ge=0, lt=1, description="max shift as a fraction of the image size")
    shear: float = Field(0.2, ge=0, le=45, description="max shear angle in degrees (Keras semantics: the reference's 0.2 is a tiny shear)")
    zoom: float = Field(0.2, ge=0, lt=1, description="max zoom in or out, as a fraction")
    hflip: bool = Field(False, description="random horizontal flips")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_FROM_WEIGHTS = ("resize", "interpolation", "mean", "std")


class PreprocessConfig(StrictModel):
    """How the evaluation image is made from a source image (:mod:`raycf.data.preprocess`); training augmentation comes after it."""

    mode: Literal["squash", "resize_crop", "weights"] = Field(
        "squash",
        description="squash: the whole image resized to a square (raycf's own models); resize_crop: torchvision's evaluation transform, "
        "the shorter side resized to resize, then a centre crop of data.image_size; weights: resize_crop with the resize ratio, "
        "interpolation, mean and std of model.arch's pretrained weights (torchvision's weights.transforms(), timm's resolve_data_config)",
    )
    resize: int = Field(0, ge=0, description="resize_crop: the shorter side before the centre crop; 0 picks data.image_size·256/224")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field("bilinear", description="how images are resized (antialiased)")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="per-channel mean of the normalisation (RGB, images in [0, 1])")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per-channel standard deviation of the normalisation")

    @model_validator(mode="after")
    def _positive_std(self) -> "PreprocessConfig":
        if any(value <= 0 for value in self.std):
            raise ValueError(f"data.preprocess.std must be positive (got {list(self.std)})")
        return self


PLANT_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
GROUP_METRICS = ("val_worst_group_acc", "val_mean_group_acc")  # search.metric values that need groups (data.plant or data.groups)


class PlantConfig(StrictModel):
    """A known bug planted in the dataset (:mod:`raycf.method.plant`): a spurious feature on one class's images, at a high rate in training."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_name: str = Field(alias="class", description="the class whose training images carry the feature (as the dataset names it; checked before anything runs)")
    kind: Literal["patch", "tint"] = Field("patch", description="patch: a small square of constant value in a corner; tint: the whole image blended towards data.plant.colour by data.plant.value")
    size: int = Field(4, gt=0, description="patch: the square's side in pixels of the stored image (at most its side)")
    corner: Literal["top_left", "top_right", "bottom_left", "bottom_right"] = Field("top_left", description="patch: where the square goes")
    value: float = Field(1.0, ge=0, le=1, description="patch: the square's intensity (0 black, 1 white); tint: the blend weight of the colour")
    colour: tuple[float, float, float] = Field((1.0, 0.0, 0.0), description="tint: the RGB colour (each in [0, 1]) blended in")
    train_rate: float = Field(0.95, ge=0, le=1, description="share of the class's training images that carry the feature")
    other_rate: float = Field(0.05, ge=0, le=1, description="share of the other classes' training images that carry it")
    eval_rate: float = Field(0.5, ge=0, le=1, description="share of every class's validation and test images that carry it")

    _class_as_text = field_validator("class_name", mode="before")(lambda value: str(value) if isinstance(value, int) and not isinstance(value, bool) else value)

    @field_validator("colour")
    @classmethod
    def _colour_in_range(cls, colour: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not 0 <= value <= 1 for value in colour):
            raise ValueError(f"expected each of the RGB values in [0, 1] (got {list(colour)})")
        return colour


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it


class DataConfig(StrictModel):
    """Where the images come from, how they are split, stored and augmented."""

    kind: Literal["digits", "fashion_mnist", "cub200", "imagefolder"] = Field(
        "digits",
        description="digits (embedded, scikit-learn), fashion_mnist (IDX files, Debian's dataset-fashion-mnist), "
        "cub200 (official CUB_200_2011 folder) or imagefolder",
    )
    root: str | None = Field(
        None, description=f"dataset folder; required for cub200 and imagefolder; fashion_mnist defaults to {FASHION_MNIST_ROOT}"
    )
    image_size: int = Field(0, ge=0, description="side of the square model input in pixels; 0 picks 32 for digits and fashion_mnist, 224 otherwise")
    stored_side: int = Field(
        0, ge=0, description="side of the decoded uint8 images the images stage stores; 0 picks image_size for digits and fashion_mnist, 8/7 of it otherwise (256 for 224)"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the training split held out for validation, by seed")
    test_fraction: float = Field(
        0.6, gt=0, lt=1, description="digits only: share of the 1,797 images held out as the test split (stratified)"
    )
    max_per_split: int = Field(
        0, ge=0, description="the most images kept per split, a stratified sample by seed (0: every image); for smoke runs of large datasets"
    )
    bbox_crop: bool = Field(False, description="cub200 only: crop each image to its bounding_boxes.txt box")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="how evaluation images are made (augmentation comes after)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="training augmentation")
    plant: PlantConfig | None = Field(None, description="plant a known bug: a spurious feature on one class (class, kind, size, corner, value, colour, train_rate, other_rate, eval_rate); every image gets a group, class × planted")
    groups: str | None = Field(None, description="a CSV or Parquet file of image_id -> group (the user's own groups; images it leaves out are grouped by class); not with data.plant")
    decode_actors: int = resource_field(2, "CPU actors of the images stage that decode and resize the dataset", gt=0)
    loader_workers: int = resource_field(0, "DataLoader worker processes per training worker (they only slice the uint8 store)", ge=0)

    @model_validator(mode="after")
    def _root_and_size(self) -> "DataConfig":
        if self.kind == "fashion_mnist" and not self.root:
            object.__setattr__(self, "root", FASHION_MNIST_ROOT)
        if self.kind != "digits" and not self.root:
            raise ValueError(f"data.root is required for data.kind={self.kind} (expected the dataset folder)")
        if self.image_size == 0:
            object.__setattr__(self, "image_size", 32 if self.kind in ("digits", "fashion_mnist") else 224)
        if self.image_size < 8:
            raise ValueError(f"data.image_size must be at least 8 pixels (got {self.image_size})")
        if self.stored_side and self.stored_side < self.image_size:
            raise ValueError(f"data.stored_side must be at least data.image_size ({self.image_size}; got {self.stored_side})")
        if self.preprocess.mode != "squash" and self.stored_side not in (0, self.image_size):
            raise ValueError(f"data.stored_side: with data.preprocess.mode {self.preprocess.mode} the stored image is the crop (expected 0 or data.image_size, {self.image_size})")
        if self.preprocess.mode == "resize_crop" and self.preprocess.resize == 0:
            object.__setattr__(self.preprocess, "resize", round(self.image_size * 256 / 224))
        if self.plant is not None and self.plant.kind == "patch" and self.plant.size > (self.stored_side or self.image_size):
            raise ValueError(f"data.plant.size: the patch must fit the stored image (expected at most {self.stored_side or self.image_size} pixels; got {self.plant.size})")
        if self.plant is not None and self.groups:
            raise ValueError("data.groups: a planted study's groups are class × planted (expected data.plant or data.groups, not both)")
        if self.preprocess.mode == "resize_crop" and self.preprocess.resize < self.image_size:
            raise ValueError(f"data.preprocess.resize must be at least data.image_size ({self.image_size}; got {self.preprocess.resize})")
        return self


class ModelConfig(StrictModel):
    """The classifier (METHOD §1 contract)."""

    arch: str = Field(
        VGG_TINY,
        description=f"{accepted_names(markdown=True)}; vgg_tiny is a small VGG-style net for CPUs, the others torchvision's names; "
        f"refused: {refused_names(markdown=True)} (their heads are not linear in pooled filters)",
    )
    weights: str = Field(
        "none",
        description="none (random init), imagenet (torchvision's or timm's weights from the local cache, under a new head), "
        "or a path: a raycf checkpoint, or a torchvision or timm state_dict of model.arch",
    )
    weights_trunk_only: bool = Field(
        False,
        description="with a state_dict in model.weights: adopt its trunk under a new head (its own head is dropped and its class count not "
        "checked); needed for a torchvision VGG state_dict, whose head is three FC layers",
    )
    weights_prefix: str | None = Field(
        None,
        description="the key prefix of the model's weights in model.weights (e.g. model. in a Lightning checkpoint, whose LightningModule holds "
        "the network as self.model): stripped, and keys outside it ignored; left out, a prefix is found when exactly one fits model.arch",
    )
    class_names: tuple[str, ...] | None = Field(
        None,
        description="the class order of a state_dict's head when it is not the dataset's sorted class order: the dataset's classes, "
        "each once; the head's rows are put in the dataset's order",
    )
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout before the linear head (training only)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="arithmetic of training and inference: auto is bf16 on a CUDA device that supports it, fp32 on the CPU; fp16 adds a GradScaler"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        family_of(arch)  # a ValueError names the accepted families, or why this one is refused
        return arch

    _class_names_as_text = field_validator("class_names", mode="before")(names_as_text)
