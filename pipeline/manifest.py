"""Manifests: where a dataset's seed set comes from and which URL lists or local image folders and archives extend
it (manifests/<dataset>.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from dextra.pipeline.errors import ParamsError, validation_message
from dextra.pipeline.paths import Paths


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subset(_Strict):
    """A fixed random part of a large seed set (e.g. a COCO subset). Drawn with its own seed, so it stays the same
    when params.seed changes, and a larger size keeps every image of a smaller one."""

    train: int | None = Field(None, ge=1, description="at most this many train images (null: all)")
    test: int | None = Field(None, ge=1, description="at most this many test images (null: all)")
    seed: int = Field(0, ge=0)


class DemoSeed(_Strict):
    importer: Literal["demo"]


class _DatasetSeed(_Strict):
    path: str = Field(description="the dataset's folder: absolute, ~/..., or relative to the repository root")
    subset: Subset | None = None

    def folder(self, root: Path) -> Path:
        return root / Path(self.path).expanduser()


class FolderSeed(_DatasetSeed):
    """<path>/captions.csv: filename, caption[, class][, split]; images without a split are split by params.seed."""

    importer: Literal["folder"]


class CubSeed(_DatasetSeed):
    """CUB-200-2011 with the Reed et al. captions, in the layout of VQ-Diffusion and the paper's code."""

    importer: Literal["cub"]
    images: str = Field("images", description="folder of <class>/<image>.jpg, relative to path")
    captions: str = Field("text", description="Reed et al. captions, <class>/<image>.txt, relative to path")
    split: Literal["lists", "official"] = Field(
        "lists",
        description="lists: train/filenames.pickle and test/filenames.pickle under path (the paper's split); "
        "official: train_test_split.txt beside the images folder",
    )


class OxfordSeed(_DatasetSeed):
    """Oxford-102 flowers (jpg/, imagelabels.mat, setid.mat) with the Reed et al. captions; trnid + valid are train."""

    importer: Literal["oxford"]
    captions: str = Field("text_c10", description="Reed et al. captions, class_NNNNN/image_NNNNN.txt, relative to path")


class CocoSeed(_DatasetSeed):
    """COCO 2014 captions: train2014 is the train split and val2014 the test split."""

    importer: Literal["coco"]


SeedSource = Annotated[
    DemoSeed | FolderSeed | CubSeed | OxfordSeed | CocoSeed,
    Field(discriminator="importer", description="how the seed set is read"),
]


class ColumnMap(_Strict):
    url: str = "url"
    text: str | None = "text"
    query: str | None = "query"
    class_: str | None = Field("class", alias="class")


class UrlSource(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names data/urls/<name>.parquet")
    path: str | None = Field(None, description="a local URL list, relative to the repository root")
    url: str | None = Field(None, description="where to download the URL list from (needs sha256)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    format: Literal["csv", "tsv", "parquet", "jsonl"] = "csv"
    columns: ColumnMap = ColumnMap()

    @model_validator(mode="after")
    def _one_location(self) -> UrlSource:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of path or url")
        if self.url is not None and self.sha256 is None:
            raise ValueError("a downloaded list needs its sha256")
        return self


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


class LocalSource(_Strict):
    """Images already on disk (a folder, or a tar/zip archive such as a released extra set) as an extra source: each
    image goes through fetch, embed and curate like a crawled one (crawl/local.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names data/urls/<name>.parquet")
    images: str = Field(
        description="a folder or a .tar/.tar.gz/.tgz/.tar.bz2/.tar.xz/.zip of images, under the repository's lists/ "
        "(where the urls stage's DVC dependency sees every change)"
    )
    captions: str | None = Field(
        None, description="a CSV inside the folder or archive: file (path inside it), text[, class]"
    )
    class_from_folder: bool = Field(False, description="an image's first folder names its class (and its query)")
    max_unpacked_bytes: int = Field(
        200_000_000_000, ge=1, description="an archive whose images add up to more is refused (archive bombs)"
    )

    @model_validator(mode="after")
    def _under_lists(self) -> LocalSource:
        parts = Path(self.images).parts
        if Path(self.images).is_absolute() or parts[:1] != ("lists",) or ".." in parts or len(parts) < 2:
            raise ValueError(f"images: {self.images!r} must be a path under lists/ (relative to the repository)")
        return self

    @property
    def is_archive(self) -> bool:
        return self.images.lower().endswith(ARCHIVE_SUFFIXES)


def _source_kind(value) -> str:
    return "local" if isinstance(value, LocalSource) or (isinstance(value, dict) and "images" in value) else "list"


Source = Annotated[
    Annotated[UrlSource, Tag("list")] | Annotated[LocalSource, Tag("local")], Discriminator(_source_kind)
]


class Manifest(_Strict):
    name: str
    seed: SeedSource
    sources: list[Source] = []
    allowed_schemes: list[Literal["http", "https", "file"]] = ["http", "https"]

    @model_validator(mode="after")
    def _unique_sources(self) -> Manifest:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (each names data/urls/<name>.parquet): {names}")
        return self


def local_folder(source: LocalSource, paths: Paths) -> Path:
    """Where a local source's image files are: its folder, or where its archive is unpacked."""
    return paths.local_sources / source.name if source.is_archive else paths.root / source.images


def load_manifest(dataset: str, paths: Paths) -> Manifest:
    path = paths.manifest(dataset)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in paths.manifests.glob("*.yaml"))) or "none"
        raise ParamsError(f"dataset: no manifest {path} (known: {known})")
    try:
        return Manifest.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as exc:
        raise ParamsError(validation_message(str(path), exc, "pipeline/manifest.py")) from None
