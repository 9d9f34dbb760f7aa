"""The one params schema. Every stage validates the whole of params.yaml before it touches a file,
so a typo in any section stops the run with a message naming the field, not a traceback mid-stage."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dextra.pipeline.errors import ParamsError, validation_message


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoParams(_Section):
    """Size of the embedded synthetic demo (seed set and synthetic web)."""

    n_seed: int = Field(500, ge=20, le=1797, description="seed images drawn from scikit-learn's 1,797 digits")
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    n_web: int = Field(9000, ge=50, le=100_000, description="synthetic web URLs")
    image_size: int = Field(32, ge=16, le=256, description="seed image side in pixels")
    n_corpus: int = Field(
        5000, ge=0, le=100_000, description="captioned images the demo CLIP pretrains on (data/seed/corpus.parquet)"
    )


def parse_address_rule(text: str) -> tuple[IPv4Network | IPv6Network, int | None]:
    """One `fetch.allow_addresses` entry: an IP or network, optionally with a port ("127.0.0.1:8080",
    "10.0.0.0/8", "[::1]:8080"). Allowed addresses may be fetched from although they are not public."""
    text = text.strip()
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (rest or None)
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        network = ip_network(host, strict=False)
        port_number = None if port is None else int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network with an optional :port") from None
    if port_number is not None and not 0 < port_number < 65536:
        raise ValueError(f"{text!r}: port {port_number} is out of range")
    return network, port_number


class PoliteParams(_Section):
    """How hard one web host is pushed (crawl/polite.py); the limits hold across all fetch workers of a machine."""

    connections_per_host: int = Field(4, ge=1, le=256, description="requests in flight to one host at a time")
    requests_per_second: float = Field(
        5.0,
        ge=0,
        description="requests started per second to one host, on average, in bursts of at most connections_per_host "
        "(0: no limit); a longer robots.txt Crawl-delay is kept strictly",
    )
    backoff_s: float = Field(1.0, gt=0, description="pause of a host after a 429 or 503; doubles while they go on")
    max_backoff_s: float = Field(60.0, gt=0, description="longest pause, unless the host's Retry-After asks more")
    retries: int = Field(
        2, ge=0, le=20, description="times a URL answered 429 or 503 is tried again in the same run, after the pause"
    )
    robots_txt: bool = Field(True, description="honour each site's robots.txt for fetch.user_agent_token")

    @model_validator(mode="after")
    def _pauses(self) -> PoliteParams:
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s:g}) is below backoff_s ({self.backoff_s:g})")
        return self


class FetchParams(_Section):
    """How images are fetched, stored and guarded (crawl/fetch.py, crawl/safety.py, crawl/worker.py)."""

    image_size: int = Field(32, ge=8, le=4096, description="stored crawl images are resized to this side")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = Field(
        "keep_ratio",
        description="img2dataset's modes: keep_ratio sets the shorter side, keep_ratio_largest the longer one",
    )
    resize_only_if_bigger: bool = Field(False, description="never upscale: smaller images are stored at their size")
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality, or PNG compression level")
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    processes: int = Field(2, ge=1, le=512)
    threads: int = Field(16, ge=1, le=1024)
    timeout_s: float = Field(
        10.0, gt=0, description="each connect and each read; max_seconds bounds the whole transfer"
    )
    max_seconds: float = Field(30.0, gt=0, description="total time per image, redirects and body included")
    max_bytes: int = Field(10_000_000, ge=1024, description="bodies longer than this are cut off and refused")
    max_pixels: int = Field(
        40_000_000, ge=1, description="images with more pixels (read from the header) are never decoded"
    )
    transient_retries: int = Field(
        2,
        ge=0,
        le=100,
        description="later runs that retry a URL whose failure was transient (timeout, 5xx, 429, reset)",
    )
    allow_addresses: list[str] = Field(
        [], description="non-public addresses that may be fetched from: IP or network, optional :port"
    )
    opt_out: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"], description="X-Robots-Tag directives that opt an image out"
    )
    shard_size: int = Field(
        10_000, ge=1, description="URLs per img2dataset shard; a finished shard is never fetched again"
    )
    user_agent_token: str = Field(
        "img2dataset",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="the crawler's name in its User-Agent, for robots.txt and X-Robots-Tag directives",
    )
    polite: PoliteParams = PoliteParams()

    @field_validator("allow_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_address_rule(entry)
        return value

    @model_validator(mode="after")
    def _png_level(self) -> FetchParams:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError("encode_quality is the PNG compression level (1-9) when encode_format is png")
        return self


class ClipParams(_Section):
    model: str = Field(description="open_clip model name (e.g. ViT-B-32) or a bundled config name")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or a local checkpoint path")
    train_epochs: int = Field(
        20, ge=0, le=10_000, description="contrastive epochs on seed train pairs; 0 keeps the loaded weights"
    )
    batch_size: int = Field(128, ge=2, le=65_536)
    lr: float = Field(0.0003, gt=0, le=1.0)
    weight_decay: float = Field(0.1, ge=0, le=10.0)
    holdout_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of seed train held out to pick the best epoch (early stopping)"
    )
    patience: int = Field(10, ge=1, description="epochs without a better held-out loss before training stops")
    augment: bool = Field(
        True,
        description=(
            "train on images zoomed out onto their border colour, squeezed, rotated, sheared, shifted, "
            "stroke-thickened/thinned, blurred and lightly noised: "
            "changes no caption states (no colour change, no flip)"
        ),
    )
    class_loss_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description=(
            "weight of a cross-entropy on the seed classes (linear head on the image embedding) added to the "
            "contrastive loss; 0, or a seed without classes: plain CLIP"
        ),
    )

    corpus_epochs: int = Field(
        12,
        ge=0,
        le=10_000,
        description=(
            "contrastive epochs on data/seed/corpus.parquet before seed train (the demo's stand-in for web-scale "
            "pretraining; other importers write an empty corpus, which is skipped)"
        ),
    )
    corpus_lr: float = Field(0.003, gt=0, le=1.0, description="peak learning rate on the corpus")
    corpus_class_loss_weight: float = Field(
        4.0, ge=0, le=100, description="class_loss_weight on the corpus (its classes are the seed's)"
    )


class EmbedParams(_Section):
    """How the embed stage runs (filter/embed_workers.py): its outputs do not depend on these."""

    batch_size: int = Field(256, ge=1, le=65_536)
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader processes decoding images for each embedder")
    num_processes: int = Field(
        1,
        ge=1,
        le=4096,
        description="embedders, each loading the model once and taking whole shards; on CUDA one per GPU in turn",
    )
    distributor: Literal["multiprocessing", "ray"] = Field(
        "multiprocessing", description="processes on this machine, or Ray actors on the cluster RAY_ADDRESS names"
    )


class CurateParams(_Section):
    # text extrapolation
    k_neighbors: int = Field(5, ge=1, le=256, description="seed neighbours used for the text extrapolation")
    ridge: float = Field(0.01, ge=0, le=100.0, description="ridge term of the least-squares weights")
    # similarity to the seed set, and the thresholds calibrated on the seed's own spread
    seed_k: int = Field(5, ge=1, le=256, description="nearest seed images averaged into a similarity-to-seed score")
    # duplicates: CLIP proposes; close pHashes, or else alignment (filter/copies.py), confirm
    near_duplicate_similarity: float = Field(
        0.9, ge=-1, le=1, description="CLIP similarity above which two crawled images are compared as possible copies"
    )
    near_duplicate_hash_distance: int = Field(
        2, ge=0, le=64, description="pHash bits within which a possible copy is a copy without alignment"
    )
    near_duplicate_copy_score: float = Field(
        0.96, ge=0, le=1, description="alignment R^2 at which a possible copy is a copy (either way round)"
    )
    # leaks: CLIP proposes, alignment verifies (filter/copies.py)
    leak_candidates: int = Field(
        2, ge=1, le=1024, description="seed test images nearest by CLIP that each crawled image is verified against"
    )
    leak_proposals: int = Field(
        2, ge=0, le=1024, description="more test images, best by a whole-picture comparison in 8 turns, verified too"
    )
    leak_gate: float = Field(
        0.8, ge=0, le=1, description="coarse alignment R^2 a pair (leak or near copy) needs to be refined"
    )
    leak_copy_score: float = Field(
        0.95, ge=0, le=1, description="refined alignment R^2 at which a crawled image copies a seed test image"
    )
    leak_workers: int = Field(
        0,
        ge=0,
        le=1024,
        description="processes aligning leak and near-copy pairs (0: one per CPU); decisions stay the same",
    )
    # detector 1: clusters per query
    cluster_detector: bool = True
    clusters_per_query: int = Field(8, ge=1, le=4096)
    min_cluster_size: int = Field(5, ge=1)
    cluster_percentile: float = Field(
        1.0,
        ge=0,
        le=100,
        description=(
            "clusters whose centre is less similar to the seed than this percentile of the seed's own spread "
            "are dropped"
        ),
    )
    # detector 2: a classifier trained on the seed classes
    class_detector: bool = True
    min_class_confidence: float = Field(0.3, ge=0, le=1)
    classifier_c: float = Field(10.0, gt=0, description="inverse regularisation strength of the logistic regression")
    # distance to the seed set, per image
    distance_detector: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on only when the seed set has no classes"
    )
    distance_percentile: float = Field(
        5.0,
        ge=0,
        le=100,
        description="images less similar to the seed than this percentile of the seed's own spread are dropped",
    )
    # faiss
    exact_index_max: int = Field(20_000, ge=1, description="vectors up to which indexes are exact (flat); above, IVF")
    nprobe: int = Field(4, ge=1, le=65_536, description="inverted lists searched per query in IVF indexes")

    @field_validator("distance_detector", mode="before")
    @classmethod
    def _on_off_as_written(cls, value: object) -> object:
        """YAML 1.1 reads a bare on / off as a boolean (DVC writes them bare after `dvc exp run -S`): take it back."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class ReportParams(_Section):
    gallery_size: int = Field(24, ge=0, le=1000)


class ExportParams(_Section):
    """`dextra export`: the curated extra set in the formats other trainers read."""

    formats: list[Literal["webdataset", "hf"]] = Field(
        ["webdataset", "hf"],
        min_length=1,
        description="webdataset: tar shards of jpg/txt/json as img2dataset writes them; hf: a datasets.DatasetDict "
        "saved with save_to_disk",
    )
    include_seed: bool = Field(True, description="also export the seed train and test splits")
    samples_per_shard: int = Field(10_000, ge=1, le=1_000_000, description="images per webdataset tar")

    @field_validator("formats")
    @classmethod
    def _each_format_once(cls, formats: list[str]) -> list[str]:
        repeated = sorted({f for f in formats if formats.count(f) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once: each format is written once")
        return formats


class UNetParams(_Section):
    block_out_channels: list[int] = Field([16, 32, 32], min_length=1, max_length=6)
    layers_per_block: int = Field(1, ge=1, le=8)
    attention_head_dim: int = Field(32, ge=1, le=256, description="channels per attention head")
    text_injection: Literal["cross_attention", "affine"] = Field(
        "cross_attention",
        description=(
            "cross_attention: blocks below full resolution attend to the condition tokens; affine: the condition "
            "joins the timestep embedding, which scales and shifts every ResNet block (no attention)"
        ),
    )


class DiTParams(_Section):
    """A DiT-style transformer (diffusers' PixArtTransformer2DModel): patches, adaLN-single timestep, cross-attention
    to the condition."""

    patch_size: int = Field(2, ge=1, le=16)
    num_layers: int = Field(4, ge=1, le=64)
    num_attention_heads: int = Field(4, ge=1, le=64)
    attention_head_dim: int = Field(16, ge=4, le=256)


class RATParams(_Section):
    """train/rat.py: a DiT whose blocks are grouped; an LSTM cell stepped once per group on the text embedding gives
    each group's scale and shift (the paper's recurrent affine text injection)."""

    patch_size: int = Field(2, ge=1, le=16)
    num_groups: int = Field(2, ge=1, le=64, description="block groups, one recurrent step each")
    blocks_per_group: int = Field(2, ge=1, le=64)
    num_attention_heads: int = Field(4, ge=1, le=64)
    attention_head_dim: int = Field(16, ge=4, le=256)
    recurrent_dim: int = Field(128, ge=8, le=8192, description="LSTM hidden size")


class TrainParams(_Section):
    """Shared by pretrain and finetune (finetune takes backbone, conditioning and VAE from the pretrained model)."""

    resolution: int = Field(16, ge=8, le=1024, description="training image side in pixels (before the VAE, if any)")
    batch_size: int = Field(32, ge=1, le=65_536, description="images per process per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    backbone: Literal["unet", "dit", "rat"] = "rat"
    unet: UNetParams = UNetParams()
    dit: DiTParams = DiTParams()
    rat: RATParams = RATParams()
    vae: str | None = Field(
        None,
        description=(
            "diffusers AutoencoderKL (local folder or hub name) to train in its latent space; null trains on pixels"
        ),
    )
    conditioning: Literal["pooled", "tokens", "image"] = Field(
        "pooled",
        description="pooled CLIP text embedding (the paper's), per-token CLIP text states, or the CLIP image embedding",
    )
    condition_tokens: int = Field(4, ge=1, le=77, description="tokens a pooled or image embedding is projected to")
    cross_attention_dim: int = Field(
        64, ge=8, le=4096, description="width of the condition tokens the backbone attends to"
    )
    text_encoder: str | None = Field(
        None,
        description="tokens conditioning: a transformers text encoder (RoBERTa, T5, CLIP text, …), local folder or hub "
        "name, with its tokenizer; null: the CLIP text transformer of models/clip",
    )
    train_text_encoder: bool = Field(
        False, description="fine-tune the text encoder (tokens conditioning only); frozen by default"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    compile: bool = Field(False, description="torch.compile the denoiser")
    num_processes: int = Field(
        1,
        ge=1,
        le=65_536,
        description="training processes on all machines together; above 1 the training stages start themselves "
        "under `accelerate launch` (one process per GPU; gloo on CPU)",
    )
    num_machines: int = Field(1, ge=1, le=4096)
    machine_rank: int = Field(0, ge=0, description="0 runs `dvc repro`; machine r runs `dextra <stage>` with r")
    main_process_ip: str | None = Field(None, description="address of machine 0, when num_machines > 1")
    main_process_port: int = Field(29500, ge=1, le=65_535)
    deterministic: bool = Field(False, description="deterministic kernels (torch.use_deterministic_algorithms)")
    checkpoint_every: int = Field(250, ge=1, description="optimizer steps between checkpoints in checkpoints/<phase>/")
    checkpoints_kept: int = Field(2, ge=1, le=1000)
    grid_samples: int = Field(8, ge=0, le=64, description="samples in the grid logged at each checkpoint; 0 = none")
    monitor_samples: int = Field(
        32,
        ge=0,
        le=100_000,
        description=(
            "samples for seed test captions scored with CLIP-FD at each checkpoint (dvclive plot clip_fd); "
            "0 = none, 1 is too few"
        ),
    )
    random_flip: bool = Field(
        False, description="mirror training images left-right; off when mirroring changes what the caption says"
    )
    condition_dropout: float = Field(0.1, ge=0, lt=1, description="probability of training on the NULL condition")
    num_train_timesteps: int = Field(1000, ge=10, le=10_000)
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction",
        description="what the UNet predicts; v learns the condition's colours and layout in far fewer steps",
    )
    ema_decay: float = Field(0.995, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)

    @field_validator("monitor_samples")
    @classmethod
    def _enough_for_a_distance(cls, value: int) -> int:
        if value == 1:
            raise ValueError("a Fréchet distance needs at least 2 samples; use 0 to switch the monitor off")
        return value

    @model_validator(mode="after")
    def _text_encoder(self) -> TrainParams:
        if self.train_text_encoder and self.conditioning != "tokens":
            raise ValueError(
                "train_text_encoder needs conditioning: tokens (pooled and image conditions are precomputed embeddings)"
            )
        if self.text_encoder and self.conditioning != "tokens":
            raise ValueError(
                "text_encoder needs conditioning: tokens (the backbone attends to the encoder's per-token states)"
            )
        if self.unet.text_injection == "affine" and self.conditioning == "tokens":
            raise ValueError(
                "unet.text_injection: affine takes one embedding per image (conditioning: pooled or image), not "
                "per-token states; use cross_attention with conditioning: tokens"
            )
        if self.num_processes % self.num_machines or self.machine_rank >= self.num_machines:
            raise ValueError(
                f"num_processes ({self.num_processes}) must be a multiple of num_machines ({self.num_machines}), "
                f"and machine_rank ({self.machine_rank}) below it"
            )
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("main_process_ip: machines 1 and up need the address of machine 0 (num_machines > 1)")
        if self.backbone == "rat" and self.conditioning == "tokens":
            raise ValueError(
                "backbone: rat reads one sentence embedding per image (conditioning: pooled or image), not per-token "
                "states; use unet or dit with conditioning: tokens"
            )
        return self


class PhaseParams(_Section):
    steps: int = Field(ge=1, le=10_000_000)
    lr: float = Field(gt=0, le=1.0)
    warmup_steps: int = Field(0, ge=0)


class PretrainParams(PhaseParams):
    warmup_steps: int = Field(20, ge=0)
    warm_start: bool = Field(
        False,
        description="start from the EMA weights of the last pretrain (checkpoints/pretrain) instead of from scratch",
    )


class FinetuneParams(PhaseParams):
    warmup_steps: int = Field(10, ge=0)


class PriorParams(_Section):
    """train/prior.py: the diffusion prior from a caption's text embedding to a CLIP image embedding that a
    `conditioning: image` model is sampled through."""

    steps: int = Field(600, ge=1, le=10_000_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0, le=1.0)
    num_layers: int = Field(2, ge=1, le=64)
    num_attention_heads: int = Field(2, ge=1, le=64)
    attention_head_dim: int = Field(32, ge=4, le=512)
    extra_pairs: bool = Field(
        True, description="also train on the curated extra set's (extrapolated text, image embedding) pairs"
    )
    sampling_steps: int = Field(25, ge=1, le=1000, description="DDIM steps drawing one image embedding")
    candidates: int = Field(
        2, ge=1, le=64, description="draws per caption, of which the one most similar to its text embedding is kept"
    )


class EvaluateParams(_Section):
    num_samples: int = Field(200, ge=2, le=100_000)
    guidance_scale: float = Field(3.0, ge=0, le=100)
    sampling_steps: int = Field(20, ge=1, le=1000)
    sampler: Literal["ddim", "dpm_solver"] = "dpm_solver"
    batch_size: int = Field(100, ge=1, le=65_536)
    baseline: bool = Field(
        True, description="also train a seed-only model (the `baseline` stage) and score it beside pretrain→finetune"
    )
    inception_weights: str | None = Field(
        None,
        description="local torch-fidelity Inception-v3 weights file; adds the standard FID and Inception Score",
    )
    finetuned_inception: str | None = Field(
        None,
        description="local state dict of a torchvision Inception-v3 fine-tuned on the dataset's classes (the "
        "StackGAN / AttnGAN evaluator of CUB and Oxford); adds its FID and Inception Score",
    )
    clipscore_model: str | None = Field(
        None, description="open_clip model for clipscore (CLIPScore, w = 2.5); null: the clip stage's model"
    )
    clipscore_pretrained: str | None = Field(
        None, description="clipscore_model's weights: a local checkpoint path or an open_clip tag already cached"
    )


class Params(_Section):
    dataset: str = Field(description="manifest name under manifests/ (demo, cub, oxford, coco or your own)")
    seed: int = Field(0, ge=0, description="random seed for every stage")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    demo: DemoParams = DemoParams()
    fetch: FetchParams = FetchParams()
    clip: ClipParams
    embed: EmbedParams = EmbedParams()
    curate: CurateParams = CurateParams()
    report: ReportParams = ReportParams()
    export: ExportParams = ExportParams()
    train: TrainParams = TrainParams()
    pretrain: PretrainParams
    finetune: FinetuneParams
    prior: PriorParams = PriorParams()
    evaluate: EvaluateParams = EvaluateParams()


def merged(base: dict, overrides: dict) -> dict:
    """`base` (a params mapping) with `overrides` laid over it, nested sections key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(validation_message(source, exc, "pipeline/params.py")) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_params(raw, str(path))
