"""Where every stage reads and writes, relative to the repository root (DESIGN.md "Stages")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    def manifest(self, dataset: str) -> Path:
        return self.manifests / f"{dataset}.yaml"

    @property
    def seed(self) -> Path:
        return self.root / "data" / "seed"

    def seed_split(self, split: str) -> Path:
        return self.seed / f"{split}.parquet"

    @property
    def demo_web(self) -> Path:
        """The demo's synthetic web: image files, its URL list and the ground truth the pipeline never reads."""
        return self.seed / "demo_web"

    @property
    def urls(self) -> Path:
        return self.root / "data" / "urls"

    @property
    def crawl(self) -> Path:
        return self.root / "data" / "crawl"

    @property
    def crawl_shards(self) -> Path:
        return self.crawl / "shards"

    @property
    def crawl_status(self) -> Path:
        return self.crawl / "status.parquet"

    @property
    def clip(self) -> Path:
        return self.root / "models" / "clip"

    @property
    def embeddings(self) -> Path:
        return self.root / "data" / "embeddings"

    @property
    def curated(self) -> Path:
        return self.root / "data" / "curated"

    @property
    def decisions(self) -> Path:
        return self.curated / "decisions.parquet"

    @property
    def curate_summary(self) -> Path:
        """Counts per outcome and the thresholds curate used."""
        return self.curated / "summary.json"

    @property
    def curated_shards(self) -> Path:
        return self.curated / "shards"

    @property
    def report(self) -> Path:
        return self.root / "data" / "report"

    def model(self, phase: str) -> Path:
        """models/pretrain or models/finetune."""
        return self.root / "models" / phase

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def live(self, stage: str) -> Path:
        """dvclive's folder for a stage: step logs, plots and images."""
        return self.root / "dvclive" / stage

    # data/embeddings/<kind>/<shard>.parquet, kind one of EMBEDDING_KINDS
    def embedding_file(self, kind: str, shard: str) -> Path:
        return self.embeddings / kind / f"{shard}.parquet"


EMBEDDING_KINDS = ("seed_images", "seed_captions", "crawl_images")
