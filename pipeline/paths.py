"""Where every stage reads and writes, relative to the repository root (docs/architecture.md, "Stages").
Every path of the project is built here and nowhere else."""

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

    def url_list(self, source: str) -> Path:
        return self.urls / f"{source}.parquet"

    @property
    def url_downloads(self) -> Path:
        """Downloaded lists, cached beside the parquet lists so an unchanged manifest downloads nothing."""
        return self.urls / "downloads"

    def url_download(self, source: str, fmt: str) -> Path:
        return self.url_downloads / f"{source}.{fmt}"

    @property
    def local_sources(self) -> Path:
        """data/local/<source>/: local sources' archives, unpacked (no DVC cache: the archive is the copy)."""
        return self.root / "data" / "local"

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
    def crawl_journal(self) -> Path:
        """Status rows of each committed img2dataset shard, until folded into status.parquet."""
        return self.crawl / "journal"

    @property
    def crawl_stats(self) -> Path:
        return self.crawl / "stats"

    @property
    def crawl_work(self) -> Path:
        """img2dataset's input and output folders, one per run; they only live while their run does."""
        return self.crawl / ".img2dataset"

    @property
    def crawl_image_settings(self) -> Path:
        """The fetch.* image settings the stored crawl images were made with."""
        return self.crawl / "image_settings.json"

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

    @property
    def report_page(self) -> Path:
        return self.report / "index.html"

    def export(self, fmt: str) -> Path:
        """data/export/<format>/: the curated set (and seed splits) written for other trainers."""
        return self.root / "data" / "export" / fmt

    def model(self, phase: str) -> Path:
        """models/pretrain, models/finetune or models/baseline."""
        return self.root / "models" / phase

    def checkpoints(self, phase: str) -> Path:
        """checkpoints/<phase>/step-*: what a killed training run resumes from."""
        return self.root / "checkpoints" / phase

    @property
    def train_cache(self) -> Path:
        """checkpoints/cache/: decoded training arrays keyed by content; safe to delete, and no DVC out."""
        return self.root / "checkpoints" / "cache"

    def bench_result(self, name: str, small: bool = False) -> Path:
        """bench/results/<name>.json; a benchmark's small size (what CI runs) writes under bench/results/small/."""
        folder = self.root / "bench" / "results"
        return (folder / "small" if small else folder) / f"{name}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def clip_metrics(self) -> Path:
        return self.metrics / "clip.json"

    @property
    def eval_metrics(self) -> Path:
        return self.metrics / "eval.json"

    def live(self, stage: str) -> Path:
        """dvclive's folder for a stage: step logs, plots and images."""
        return self.root / "dvclive" / stage

    def embedding_folder(self, kind: str) -> Path:
        """data/embeddings/<kind>/, kind one of EMBEDDING_KINDS."""
        return self.embeddings / kind

    def embedding_file(self, kind: str, shard: str) -> Path:
        return self.embedding_folder(kind) / f"{shard}.parquet"

    @property
    def embeddings_index(self) -> Path:
        """The model fingerprint and each embedded input's sha256."""
        return self.embeddings / "index.json"


EMBEDDING_KINDS = ("seed_images", "seed_captions", "crawl_images")
