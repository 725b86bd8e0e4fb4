"""Dataset lookup and preparation: our offline builders by name, or any tfds catalog dataset.

``prepare("shapes", data_dir=d, resolution=32)`` builds the dataset once into ``d`` as array_record files
(PNG images, captions, metadata; a tqdm bar while it runs) and reuses the prepared files afterwards. Our
builders: ``shapes``, ``openmoji``, ``fashion_mnist``, ``image_folder`` (options are the fields of their
BuilderConfig). Any other name (or ``"tfds:<name>"``, e.g. ``"tfds:fashion_mnist"`` for tfds' own
version) is a tfds catalog dataset, which must already be prepared in array_record format under the data
dir unless ``download=True`` (reading works without TensorFlow; preparing most catalog datasets needs it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import tensorflow_datasets as tfds

from ldm_jax.data import fashion_mnist, image_folder, openmoji, shapes
from ldm_jax.data.common import DataError, config_fields, options_digest
from ldm_jax.types import ConfigError, nearest

BUILDERS = {
    "shapes": shapes.ShapesBuilder,
    "openmoji": openmoji.OpenMojiBuilder,
    "fashion_mnist": fashion_mnist.FashionMnistBuilder,
    "image_folder": image_folder.ImageFolderBuilder,
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir:
        return str(Path(data_dir).expanduser())
    return os.environ.get("TFDS_DATA_DIR") or str(Path("~/tensorflow_datasets").expanduser())


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """A prepared dataset: its tfds builder and the examples skipped while building it."""

    builder: tfds.core.DatasetBuilder
    skipped: tuple[str, ...] = ()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def splits(self) -> dict[str, int]:
        return {name: info.num_examples for name, info in self.builder.info.splits.items()}

    def source(self, split: str = "train"):
        """Random-access source of decoded examples (dicts of numpy arrays / bytes) for `split`."""
        base = split.split("[", 1)[0]
        if base not in self.splits:
            raise DataError(
                f"dataset '{self.builder.name}' has no split '{base}'{nearest(base, self.splits)}; "
                f"available: {sorted(self.splits)}"
            )
        return self.builder.as_data_source(split=split)


def _our_config(name: str, options: dict):
    cls = BUILDERS[name]
    fields = config_fields(cls.BUILDER_CONFIG_CLASS)
    unknown = [k for k in options if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"dataset '{name}': unknown option '{k}'{nearest(k, fields)}; options: {sorted(fields)}")
    values = {**fields, **options}
    if name == "image_folder":
        if not values.get("path"):
            raise ConfigError("dataset 'image_folder' needs a folder: set data.builder_kwargs.path")
        return image_folder.folder_config(**values)
    prefix = f"r{values['resolution']}_" if "resolution" in values else ""
    return cls.BUILDER_CONFIG_CLASS(name=prefix + options_digest(values), **values)


def make_builder(name: str, *, data_dir=None, **options) -> tfds.core.DatasetBuilder:
    """The (not necessarily prepared) tfds builder for `name` with builder `options`."""
    data_dir = resolve_data_dir(data_dir)
    if name in BUILDERS:
        config = _our_config(name, dict(options))
        return BUILDERS[name](data_dir=data_dir, config=config, file_format="array_record")
    catalog_name = name.removeprefix("tfds:")
    try:
        return tfds.builder(catalog_name, data_dir=data_dir, file_format="array_record", **options)
    except tfds.core.registered.DatasetNotFoundError:
        choices = list(BUILDERS) + [f"tfds:{n}" for n in tfds.list_builders(with_community_datasets=False)]
        raise DataError(
            f"unknown dataset '{name}'{nearest(name, choices)}; ours: {sorted(BUILDERS)}, or a tfds catalog name"
        ) from None


def prepare(name: str, *, data_dir=None, download: bool = False, **options) -> BuildResult:
    """Builds `name` into `data_dir` unless already prepared there, and returns it.

    Our builders always build (offline). A catalog dataset must already be prepared in array_record format
    unless `download` is True.
    """
    builder = make_builder(name, data_dir=data_dir, **options)
    ours = name in BUILDERS
    if ours or download:
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise DataError(
            f"tfds dataset '{builder.name}' is not prepared under {builder.data_dir}; prepare it there in "
            "array_record format (or set data.download=True on a machine with network)"
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataError(
            f"tfds dataset '{builder.name}' at {builder.data_dir} is in {builder.info.file_format.value} format; "
            "grain needs random access: re-prepare it with file_format='array_record'"
        )
    metadata = builder.info.metadata or {}
    return BuildResult(builder=builder, skipped=tuple(metadata.get("skipped", ())))
