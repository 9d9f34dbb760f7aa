"""pretrain / finetune / evaluate on tiny fixtures: real diffusers models and real (short) training runs.

Resuming after SIGKILL under DVC and the 2-process run are in test_train_scale.py (slow)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel
from PIL import Image

from dextra.filter.clip import load_clip
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_embeddings
from dextra.pipeline.stages import baseline, evaluate, finetune, pretrain
from dextra.pipeline.stages import clip as clip_stage
from dextra.pipeline.stages import prior as prior_stage
from dextra.train import checkpoint
from dextra.train import data as data_module
from dextra.train.data import DataStream, Encoding, load_extra, load_seed
from dextra.train.metrics import (
    ClipFeatures,
    FinetunedInception,
    clip_fd,
    clip_frechet,
    clip_score,
    finetuned_inception_score,
    inception_frechet,
)
from dextra.train.model import ConditionProjector, Denoiser, TokenConditioner, build_denoiser, load_vae
from dextra.train.rat import RATTransformer2DModel
from dextra.train.sampling import null_guidance, sample
from dextra.train.trainer import make_accelerator
from tests.helpers.train import (
    DIM,
    NAMES,
    losses,
    read_tsv,
    state,
    unit,
    write_curated,
    write_seed,
)
from tests.helpers.train import (
    small_training_params as make_params,
)


def write_all(paths: Paths, params=None) -> None:
    write_curated(paths)
    write_seed(paths, "train", 12)
    write_seed(paths, "test", 6)
    clip_stage.run(params or make_params(), paths)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small runs are fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One tiny run of pretrain -> finetune, the seed-only baseline and evaluate, with the CLIP-FD monitor on,
    shared by the tests that inspect its outputs."""
    paths = Paths(tmp_path_factory.mktemp("root"))
    params = make_params(train=dict(monitor_samples=6, checkpoint_every=5), evaluate=dict(baseline=True))
    write_all(paths, params)
    summaries = {
        stage.__name__.rsplit(".", 1)[1]: stage.run(params, paths) for stage in (pretrain, finetune, baseline, evaluate)
    }
    return paths, params, summaries


# ---------------------------------------------------------------- learning, guidance, evaluation


def test_pretrain_learns_the_condition(tmp_path):
    paths = Paths(tmp_path)
    red, blue = write_curated(paths)
    params = make_params(pretrain=dict(steps=60))
    summary = pretrain.run(params, paths)

    curve = losses(paths)
    assert read_tsv(paths.live("pretrain") / "plots" / "metrics" / "loss.tsv", "step") == list(range(5, 65, 5))
    assert all(math.isfinite(v) for v in curve) and np.mean(curve[-2:]) < 0.7 * curve[0], curve
    assert summary["steps"] == 60 and summary["final_loss"] == pytest.approx(curve[-1], abs=1e-4)
    assert (paths.live("pretrain") / "plots" / "images" / "samples.png").exists()  # the checkpoint sample grid

    # Sampled from noise, the red condition gives red squares and the blue one blue squares.
    model = Denoiser.load(paths.model("pretrain")).eval()
    scheduler = DDIMScheduler.from_pretrained(paths.model("pretrain") / "scheduler")
    images = sample(
        model, scheduler, torch.from_numpy(np.stack([red, blue])), 10, 2.0, torch.Generator().manual_seed(0)
    )
    red_minus_blue = (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
    assert red_minus_blue[0] > 0.2 and red_minus_blue[1] < -0.2, red_minus_blue


def test_epsilon_prediction_is_trained_and_saved(tmp_path):
    paths = Paths(tmp_path)
    write_curated(paths)
    pretrain.run(make_params(pretrain=dict(steps=2), train=dict(prediction_type="epsilon", log_every=1)), paths)
    assert DDIMScheduler.from_pretrained(paths.model("pretrain") / "scheduler").config.prediction_type == "epsilon"
    assert all(math.isfinite(v) for v in losses(paths))


def test_finetune_starts_from_pretrain_ema(chain, tmp_path):
    paths, params, _ = chain
    # A one-step finetune with a negligible learning rate must hand back pretrain's EMA weights unchanged.
    warm = Paths(tmp_path)
    for source, target in (
        (paths.model("pretrain"), warm.model("pretrain")),
        (paths.seed, warm.seed),
        (paths.embeddings, warm.embeddings),
    ):
        shutil.copytree(source, target)
    finetune.run(make_params(finetune=dict(steps=1, lr=1e-12, warmup_steps=0)), warm)
    pretrained, finetuned = state(Denoiser.load(warm.model("pretrain"))), state(Denoiser.load(warm.model("finetune")))
    assert all(torch.allclose(pretrained[k], finetuned[k], atol=1e-6) for k in pretrained)
    torch.manual_seed(params.seed)
    fresh = state(build_denoiser(params.train, ConditionProjector(DIM, 32, 2)))
    assert any(not torch.allclose(pretrained[k], fresh[k]) for k in pretrained)


@pytest.mark.parametrize(
    "train", [dict(backbone="unet"), dict(backbone="unet", unet=dict(text_injection="affine")), dict(backbone="dit")]
)
def test_guidance_endpoints(train):
    params = make_params(train=train)
    torch.manual_seed(0)
    model = build_denoiser(params.train, ConditionProjector(DIM, 32, 2)).eval()
    x, condition = torch.randn(3, 3, 16, 16), torch.from_numpy(unit(np.random.default_rng(0), 3))
    t = torch.tensor(500)
    with torch.no_grad():
        conditional = model(x, t, condition)
        unconditional = model(x, t, condition, torch.ones(3, dtype=torch.bool))
        assert not torch.allclose(conditional, unconditional)
        torch.testing.assert_close(null_guidance(model, x, t, condition, 0.0), unconditional, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(null_guidance(model, x, t, condition, 1.0), conditional, atol=1e-5, rtol=1e-4)
        pushed = null_guidance(model, x, t, condition, 3.0)
        torch.testing.assert_close(pushed, unconditional + 3 * (conditional - unconditional), atol=1e-4, rtol=1e-4)


def test_evaluate_writes_metrics_and_samples(chain):
    paths, params, summaries = chain
    result = json.loads((paths.metrics / "eval.json").read_text())
    assert set(result) == {
        "clip_fd",
        "clip_score",
        "clipscore",
        "gt_clip_score",
        "gt_clipscore",
        "num_samples",
        "guidance_scale",
        "seed_only",
        "difference",
    }
    assert all(math.isfinite(result[k]) for k in ("clip_fd", "clip_score", "clipscore", "gt_clip_score"))
    assert result["num_samples"] == 12 and result["guidance_scale"] == 2.0
    assert result == summaries["evaluate"]
    live = json.loads((paths.live("evaluate") / "metrics.json").read_text())
    assert live["clip_fd"] == pytest.approx(result["clip_fd"], abs=1e-4)
    images = paths.live("evaluate") / "plots" / "images"
    assert Image.open(images / "samples.png").width == 8 * 128
    assert Image.open(images / "samples_seed_only.png").size == Image.open(images / "samples.png").size
    assert (paths.live("finetune") / "plots" / "metrics" / "loss.tsv").exists()


def test_seed_only_baseline_trains_as_long_as_both_phases_and_is_scored_beside(chain):
    paths, params, summaries = chain
    assert summaries["baseline"]["steps"] == params.pretrain.steps + params.finetune.steps == 20
    assert summaries["baseline"]["images"] == 12  # the seed train set, not the extra set
    result = json.loads((paths.metrics / "eval.json").read_text())
    seed_only = result["seed_only"]
    assert set(seed_only) == {"clip_fd", "clip_score", "clipscore"}
    assert all(math.isfinite(v) for v in seed_only.values())
    for name in ("clip_fd", "clip_score", "clipscore"):
        assert result["difference"][name] == pytest.approx(result[name] - seed_only[name], abs=2e-5)
    # Two different models sampled from the same noise: the scores differ.
    assert seed_only["clip_fd"] != result["clip_fd"]


def test_baseline_off_leaves_notes_and_evaluate_scores_one_model(chain, tmp_path):
    paths, _, _ = chain
    other = Paths(tmp_path)
    for part in ("models", "data"):
        shutil.copytree(paths.root / part, other.root / part)
    shutil.rmtree(other.model("baseline"))
    assert baseline.run(make_params(), other) == {"skipped": "evaluate.baseline is false"}
    assert (other.model("baseline") / "skipped.json").exists() and (other.live("baseline") / "skipped.json").exists()
    assert "seed_only" not in evaluate.run(make_params(evaluate=dict(num_samples=4)), other)
    with pytest.raises(InputError, match="models/baseline: no seed-only model"):
        evaluate.run(make_params(evaluate=dict(num_samples=4, baseline=True)), other)


def test_clip_fd_of_each_checkpoint_is_logged(chain):
    paths, _, _ = chain
    for stage, steps in (("pretrain", [5, 10]), ("finetune", [5, 10]), ("baseline", [5, 10, 15, 20])):
        fd_file = paths.live(stage) / "plots" / "metrics" / "clip_fd.tsv"
        assert read_tsv(fd_file, "step") == steps, stage
        assert all(math.isfinite(v) and v >= 0 for v in read_tsv(fd_file, "clip_fd"))
        newest = checkpoint.saved(paths.checkpoints(stage))[-1]
        assert [row[0] for row in checkpoint.read_progress(newest).clip_fd] == steps


def test_evaluate_with_dpm_solver(chain, tmp_path):
    paths, _, _ = chain
    other = Paths(tmp_path)
    for part in ("models", "data"):
        shutil.copytree(paths.root / part, other.root / part)
    result = evaluate.run(make_params(evaluate=dict(sampler="dpm_solver", num_samples=4, sampling_steps=4)), other)
    assert math.isfinite(result["clip_fd"])


def test_clip_fd_is_zero_for_same_set_and_grows_with_shift(chain):
    paths, _, _ = chain
    bundle = load_clip(paths.clip)
    images = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = clip_fd(bundle, images, images, batch_size=16)
    shifted = clip_fd(bundle, images, (images * 0.5 + 0.5), batch_size=16)
    assert abs(same) < 1e-4
    assert shifted > 100 * max(abs(same), 1e-6)
    assert ClipFeatures(bundle)(images[:2]).shape == (2, bundle.embed_dim)
    # One distance to fixed real images scores several sets as fresh metrics would.
    distance = clip_frechet(bundle, images, batch_size=16)
    assert [distance(images * 0.5 + 0.5), distance(images)] == pytest.approx([shifted, same], abs=1e-4)


def test_clip_score_is_the_mean_clipped_cosine_of_each_pair(chain):
    paths, _, _ = chain
    bundle = load_clip(paths.clip)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    captions = [f"a {NAMES[i % 2]} square number {i}" for i in range(6)]
    cosines = (bundle.encode_pixels(images).float() * torch.from_numpy(bundle.encode_texts(captions))).sum(-1)
    expected = float(100 * cosines.clamp(min=0).mean())
    assert clip_score(bundle, images, captions, batch_size=4) == pytest.approx(expected, rel=1e-5)
    order = [5, 3, 1, 0, 2, 4]  # moving pairs together keeps the score; splitting them changes it
    assert clip_score(bundle, images[order], [captions[i] for i in order], batch_size=4) == pytest.approx(
        expected, rel=1e-5
    )
    assert clip_score(bundle, images, [captions[i] for i in order], batch_size=4) != pytest.approx(expected, rel=1e-3)
    assert 0 <= expected <= 100


def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as the state-dict file FID reads (the real one
    cannot be downloaded here; the metric's code path is the same)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    torch.save({}, path)
    torch.manual_seed(0)
    torch.save(Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).state_dict(), path)
    return path


def test_inception_fid_reads_local_weights_and_is_zero_for_same_set(tmp_path):
    weights = random_inception_weights(tmp_path / "inception.pth")
    images = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    frechet = inception_frechet(weights, images, batch_size=12, device=torch.device("cpu"))  # as evaluate scores
    same, shifted = frechet(images), frechet(images * 0.3)  # two image sets against one real set
    assert abs(same) < 1e-3 * max(1.0, shifted)
    assert shifted > 0 and shifted > 100 * abs(same)


def finetuned_inception(path: Path, classes: int) -> Path:
    """A torchvision Inception-v3 for `classes` classes with random weights, saved as a fine-tuned one would be."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=classes)
    torch.save(net.state_dict(), path)
    return path


def test_a_finetuned_inception_reads_its_class_count_and_scores_like_an_inception(tmp_path):
    weights = finetuned_inception(tmp_path / "cub.pth", classes=7)
    network = FinetunedInception(weights)
    assert network.num_classes == 7
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert 1.0 <= finetuned_inception_score(network, 10, torch.device("cpu"))(images) <= 7.0  # FID: the test below
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="evaluate.finetuned_inception: cannot read .*junk.pth"):
        FinetunedInception(tmp_path / "junk.pth")
    torch.save({"fc.weight": torch.zeros(3, 2048), "conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="does not fit torchvision's Inception-v3"):
        FinetunedInception(tmp_path / "other.pth")


def test_evaluate_adds_the_papers_metrics_from_local_weights(chain, tmp_path):
    """FID and Inception Score from torch-fidelity's weights and from a fine-tuned Inception saved here, and
    CLIPScore (w = 2.5) with an open_clip model given by name and local checkpoint."""
    paths, _, _ = chain
    other = Paths(tmp_path / "root")
    for part in ("models", "data"):
        shutil.copytree(paths.root / part, other.root / part)
    random_inception_weights(other.root / "inception.pth")
    finetuned_inception(other.root / "finetuned.pth", classes=5)
    clip_name = json.loads((other.clip / "model.json").read_text())["model"]
    evaluated = dict(
        num_samples=4,
        inception_weights="inception.pth",
        finetuned_inception="finetuned.pth",
        clipscore_model=clip_name,
        clipscore_pretrained=str(other.clip / "checkpoint.pt"),
    )
    result = evaluate.run(make_params(evaluate=evaluated), other)
    assert math.isfinite(result["fid"]) and result["fid"] >= 0 and result["fid_finetuned"] >= 0
    assert 1.0 <= result["inception_score"] <= 1008 and 1.0 <= result["inception_score_finetuned"] <= 5
    # the same CLIP as clip_score's: CLIPScore is its cosine term rescaled by 2.5 instead of 100
    assert result["clipscore"] == pytest.approx(result["clip_score"] * 0.025, abs=1e-4)
    assert result["gt_clipscore"] == pytest.approx(result["gt_clip_score"] * 0.025, abs=1e-4)
    with pytest.raises(InputError, match="evaluate.inception_weights: .*missing.pth is not a file"):
        evaluate.run(make_params(evaluate=dict(num_samples=4, inception_weights="missing.pth")), other)
    with pytest.raises(ParamsError, match="evaluate.clipscore_model: 'no-such-clip'"):
        evaluate.run(make_params(evaluate=dict(num_samples=4, clipscore_model="no-such-clip")), other)


# ---------------------------------------------------------------- conditioning modes, backbones, latents


def test_image_conditioning_trains_on_clip_image_embeddings_and_samples_from_captions(tmp_path):
    paths = Paths(tmp_path)
    params = make_params(
        train=dict(conditioning="image"), pretrain=dict(steps=3), finetune=dict(steps=2), prior=dict(steps=20)
    )
    write_all(paths, params)
    extra = load_extra(paths, Encoding.create(paths, 16, "image"))
    _, vectors = read_embeddings([paths.embedding_file("crawl_images", "part-0")])  # written in the shard's row order
    assert len(extra) == 32 and np.allclose(np.asarray(extra.conditions, np.float32), vectors, atol=1e-3)
    seed, _ = load_seed(paths, "train", Encoding.create(paths, 16, "image"))
    assert seed.count.tolist() == [1] * 12  # one image embedding per seed image, not one per caption
    for stage in (pretrain, finetune):
        stage.run(params, paths)
    assert Denoiser.load(paths.model("finetune")).mode == "image"
    with pytest.raises(InputError, match=r"models/prior: no prior .*run `dextra prior`"):
        evaluate.run(params, paths)
    prior_stage.run(params, paths)
    scores = evaluate.run(params, paths)
    # Sampled from the prior's image embeddings, and beside that from the captions' text embeddings directly.
    assert (
        math.isfinite(scores["clip_score"]) and scores["text_embedding_directly"]["clip_score"] != scores["clip_score"]
    )


@pytest.mark.parametrize("trainable", [False, True])
def test_tokens_conditioning_runs_clip_text_transformer(tmp_path, trainable):
    paths = Paths(tmp_path)
    params = make_params(
        train=dict(conditioning="tokens", train_text_encoder=trainable), pretrain=dict(steps=3, lr=1e-2, warmup_steps=0)
    )
    write_all(paths, params)
    bundle = load_clip(paths.clip)
    extra = load_extra(paths, Encoding.create(paths, 16, "tokens"))
    # Extra images are conditioned on their best-weighted neighbour caption, tokenized once into the cache.
    expected = bundle.tokenizer([f"a {NAMES[0]} square"]).numpy()[0]
    assert extra.conditions.dtype == np.int32 and any((row == expected).all() for row in np.asarray(extra.conditions))
    pretrain.run(params, paths)
    model = Denoiser.load(paths.model("pretrain"))
    assert isinstance(model.condition, TokenConditioner) and model.condition_size == bundle.tokenizer(["x"]).shape[1]
    clip_text = {k: v for k, v in bundle.model.state_dict().items() if k in model.condition.text.state_dict()}
    text = model.condition.text.state_dict()
    assert clip_text.keys() == text.keys()
    unchanged = all(torch.equal(clip_text[k], text[k]) for k in clip_text)
    assert unchanged != trainable
    for stage in (finetune, evaluate):
        stage.run(params, paths)
    assert math.isfinite(json.loads((paths.metrics / "eval.json").read_text())["clip_fd"])


def test_rat_backbone_trains_samples_and_its_text_drives_every_block_group(tmp_path):
    """The recurrent affine DiT: saved under rat/, loaded back, sampled; a different caption embedding changes the
    scale and shift of every block group, and each group's modulation depends on the groups before it."""
    paths = Paths(tmp_path)
    write_all(paths)
    params = make_params(train=dict(backbone="rat", rat=dict(num_groups=3, blocks_per_group=1)), pretrain=dict(steps=3))
    pretrain.run(params, paths)
    model = Denoiser.load(paths.model("pretrain")).eval()
    assert (
        isinstance(model.backbone, RATTransformer2DModel) and (paths.model("pretrain") / "rat" / "config.json").exists()
    )
    rng = np.random.default_rng(0)
    text, other = (torch.from_numpy(unit(rng, 2)) for _ in range(2))
    with torch.no_grad():
        affine = model.backbone.text_affine
        ours, theirs = (affine(model.condition(c).flatten(1)) for c in (text, other))
        assert len(ours) == 3
        for (scale, shift), (other_scale, other_shift) in zip(ours, theirs, strict=True):
            assert not torch.allclose(scale, other_scale) and not torch.allclose(shift, other_shift)
        # the cell's state carries over: group 2 read from a fresh state would get group 1's modulation
        first_step_again = affine.heads[1](affine.cell(model.condition(text).flatten(1))[0])
        assert not torch.allclose(first_step_again.chunk(2, -1)[0], ours[1][0].squeeze(1))
        x, t = torch.randn(2, 3, 16, 16), torch.tensor(500)
        assert not torch.equal(model(x, t, text), model(x, t, other))  # trained gates let the text through
    scheduler = DDIMScheduler.from_pretrained(paths.model("pretrain") / "scheduler")
    images = sample(model, scheduler, text, 2, 3.0, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    finetune.run(params, paths)  # finetune takes the backbone from the pretrained model
    assert isinstance(Denoiser.load(paths.model("finetune")).backbone, RATTransformer2DModel)


def test_dit_backbone_trains_and_samples(tmp_path):
    paths = Paths(tmp_path)
    write_curated(paths)
    pretrain.run(make_params(train=dict(backbone="dit"), pretrain=dict(steps=3)), paths)
    model = Denoiser.load(paths.model("pretrain"))
    assert (
        isinstance(model.backbone, PixArtTransformer2DModel)
        and (paths.model("pretrain") / "transformer" / "config.json").exists()
    )
    scheduler = DDIMScheduler.from_pretrained(paths.model("pretrain") / "scheduler")
    images = sample(model.eval(), scheduler, torch.zeros(2, DIM), 2, 3.0, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_affine_text_injection_trains_loads_and_follows_the_text(tmp_path):
    """train.unet.text_injection: affine has no attention block: the condition reaches the output only through the
    timestep embedding's scale and shift, and still decides it."""
    paths = Paths(tmp_path)
    write_curated(paths)
    pretrain.run(make_params(train=dict(unet=dict(text_injection="affine")), pretrain=dict(steps=3)), paths)
    model = Denoiser.load(paths.model("pretrain")).eval()
    assert model.backbone.config.class_embed_type == "projection"
    assert not any("attn2" in name for name, _ in model.named_modules())  # no cross-attention anywhere
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(500)
    conditions = torch.from_numpy(unit(np.random.default_rng(1), 2))
    with torch.no_grad():
        assert not torch.allclose(model(x, t, conditions[:1].expand(2, -1)), model(x, t, conditions[1:].expand(2, -1)))
    scheduler = DDIMScheduler.from_pretrained(paths.model("pretrain") / "scheduler")
    images = sample(model, scheduler, conditions, 2, 3.0, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def tiny_vae(folder: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(folder)
    return folder


def test_latent_space_caches_latents_once_and_decodes_samples(tmp_path):
    paths = Paths(tmp_path / "root")
    vae = tiny_vae(tmp_path / "vae")
    params = make_params(
        train=dict(vae=str(vae), random_flip=True, backbone="dit"), pretrain=dict(steps=2), finetune=dict(steps=2)
    )
    write_all(paths, params)
    pretrain.run(params, paths)
    extra = load_extra(paths, Encoding.create(paths, 16, "pooled", load_vae(str(vae)), flip=True))
    assert extra.latent and extra.images[0].shape == (32, 2, 4, 8, 8)  # latents of each image and of its mirror
    assert isinstance(extra.images[0], np.memmap)
    model = Denoiser.load(paths.model("pretrain"))
    assert model.channels == 4 and model.sample_size == 8 and (paths.model("pretrain") / "vae" / "config.json").exists()
    finetune.run(params, paths)
    evaluate.run(params, paths)
    grid = Image.open(paths.live("evaluate") / "plots" / "images" / "samples.png")
    assert grid.width == 8 * 128


# ---------------------------------------------------------------- data path


def test_images_are_decoded_once_into_a_memory_mapped_cache(tmp_path, monkeypatch):
    paths = Paths(tmp_path)
    write_curated(paths)
    first = load_extra(paths, Encoding.create(paths, 16, "pooled"))
    assert (
        isinstance(first.images[0], np.memmap)
        and first.images[0].dtype == np.uint8
        and first.images[0].shape == (32, 3, 16, 16)
    )
    assert isinstance(first.conditions, np.memmap) and first.conditions.dtype == np.float16

    # A second load, and training, never decode again: no PIL on the hot path.
    monkeypatch.setattr(data_module.Image, "open", lambda *a, **k: pytest.fail("decoded an image again"))
    again = load_extra(paths, Encoding.create(paths, 16, "pooled"))
    assert again.key == first.key and np.array_equal(again.images[0], first.images[0])
    pretrain.run(make_params(pretrain=dict(steps=2)), paths)

    # A new shard decodes only itself; the set's key changes, so no old checkpoint resumes on new data.
    monkeypatch.undo()
    decoded = []
    original = data_module.decode_images
    monkeypatch.setattr(
        data_module, "decode_images", lambda blobs, *a: decoded.append(len(blobs)) or original(blobs, *a)
    )
    write_curated(paths, n=5, shard="part-1", seed=7)
    grown = load_extra(paths, Encoding.create(paths, 16, "pooled"))
    assert decoded == [5] and len(grown) == 37 and grown.key != first.key
    entries = sorted(p.name for p in paths.train_cache.iterdir())
    assert len(load_extra(paths, Encoding.create(paths, 8, "pooled")).images) == 2
    assert len(list(paths.train_cache.iterdir())) == len(entries) + 2  # another resolution: new image entries only


def test_seed_batches_pick_a_caption_of_the_drawn_image(tmp_path):
    paths = Paths(tmp_path)
    write_seed(paths, "train", 5, captions_per_image=3)
    data, captions = load_seed(paths, "train", Encoding.create(paths, 8, "pooled"))
    assert data.images[0].shape == (5, 3, 8, 8) and data.images[0].dtype == np.uint8
    assert data.count.tolist() == [3] * 5 and len(captions) == 15
    assert captions[3].endswith("number 0")  # image 1's first caption
    index = np.random.default_rng(0).integers(0, 5, 64)
    pixels, conditions = data.batch(index, torch.Generator().manual_seed(0), random_flip=False)
    assert pixels.shape == (64, 3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    table = torch.from_numpy(np.asarray(data.conditions, np.float32))
    for i, c in zip(index, conditions):  # each condition is one of the drawn image's own captions
        own = table[data.first[i] : data.first[i] + data.count[i]]
        assert any(torch.equal(c, row) for row in own)


def test_random_flip_mirrors_only_when_asked(tmp_path):
    paths = Paths(tmp_path)
    write_seed(paths, "train", 5)
    data, _ = load_seed(paths, "train", Encoding.create(paths, 8, "pooled"))
    images = torch.from_numpy(np.array(data.images[0])).float() / 127.5 - 1
    originals = {images[i].numpy().tobytes() for i in range(5)}
    mirrored = {images[i].flip(-1).numpy().tobytes() for i in range(5)} - originals
    index = np.arange(64) % 5
    unflipped, _ = data.batch(index, torch.Generator().manual_seed(0), random_flip=False)
    assert all(p.numpy().tobytes() in originals for p in unflipped)
    flipped, _ = data.batch(index, torch.Generator().manual_seed(0), random_flip=True)
    assert any(p.numpy().tobytes() in mirrored for p in flipped)


def test_data_stream_is_a_function_of_the_position():
    stream = DataStream(10, seed=0, name="pretrain")
    epoch0 = stream.indices(0, 10)
    assert sorted(epoch0) == list(range(10))  # an epoch is a permutation
    # Two processes with batch 2: process r reads positions step*4 + r*2 ...; within an epoch nobody sees an image
    # twice.
    seen = [stream.indices(step * 4 + rank * 2, 2) for step in range(2) for rank in range(2)]
    assert len(set(np.concatenate(seen))) == 8
    # Across the epoch boundary, and from a fresh stream (a resumed run), the same positions give the same images.
    assert np.array_equal(
        DataStream(10, 0, "pretrain").indices(8, 4), np.concatenate([epoch0[8:], stream.order(1)[:2]])
    )
    assert not np.array_equal(stream.order(1), epoch0) and not np.array_equal(
        DataStream(10, 0, "finetune").order(0), epoch0
    )
    a, b = stream.generators(8, torch.device("cpu")), DataStream(10, 0, "pretrain").generators(8, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a[1]), torch.rand(4, generator=b[1]))


# ---------------------------------------------------------------- checkpoints, resume, warm start


def test_resumed_run_continues_exactly(tmp_path):
    """A 6-step run equals a 3-step run continued to 6 (phase.steps may grow): losses and weights, bit for bit."""
    whole, parts = Paths(tmp_path / "whole"), Paths(tmp_path / "parts")
    for paths in (whole, parts):
        write_curated(paths)
    common = dict(train=dict(log_every=1, checkpoint_every=3, random_flip=True, condition_dropout=0.3))
    pretrain.run(make_params(**common, pretrain=dict(steps=6)), whole)
    pretrain.run(make_params(**common, pretrain=dict(steps=3)), parts)
    summary = pretrain.run(make_params(**common, pretrain=dict(steps=6)), parts)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    assert losses(parts) == losses(whole) and len(losses(whole)) == 6  # history replayed into dvclive, then continued
    a, b = state(Denoiser.load(whole.model("pretrain"))), state(Denoiser.load(parts.model("pretrain")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    progress = checkpoint.read_progress(checkpoint.saved(parts.checkpoints("pretrain"))[-1])
    assert progress.step == 6 and progress.position == 6 * 8


def test_checkpoint_layout_and_pruning(tmp_path):
    paths = Paths(tmp_path)
    write_curated(paths)
    folder = paths.checkpoints("pretrain")
    (folder / ".step-00000001.tmp").mkdir(parents=True)  # what a save killed halfway leaves
    every_2 = dict(checkpoint_every=2, checkpoints_kept=2)
    pretrain.run(make_params(train=every_2, pretrain=dict(steps=7)), paths)
    assert [p.name for p in checkpoint.saved(folder)] == ["step-00000006", "step-00000007"]
    assert not list(folder.glob(".*"))
    files = {p.name for p in (folder / "step-00000007").iterdir()}
    assert {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        checkpoint.EMA_FILE,
        "custom_checkpoint_1.pkl",
        checkpoint.STATE,
    } <= files

    # Fewer steps: it resumes from the newest checkpoint at or before them, and drops the ones past them.
    assert pretrain.run(make_params(train=every_2, pretrain=dict(steps=6)), paths)["resumed_from_step"] == 6
    assert pretrain.run(make_params(train=every_2, pretrain=dict(steps=5)), paths)["resumed_from_step"] is None
    assert [p.name for p in checkpoint.saved(folder)] == ["step-00000004", "step-00000005"]

    # Other params make a new run: it starts from scratch; its first checkpoint replaces the old run's at the same
    # step and deletes the others.
    other = make_params(train=dict(checkpoint_every=4), pretrain=dict(steps=4, lr=1e-3))
    assert pretrain.run(other, paths)["resumed_from_step"] is None
    assert [p.name for p in checkpoint.saved(folder)] == ["step-00000004"]
    assert checkpoint.read_progress(folder / "step-00000004").history[-1][2] == pytest.approx(1e-3)
    # Bookkeeping params (how often to log or save) keep a checkpoint resumable.
    again = make_params(train=dict(log_every=1, checkpoint_every=3), pretrain=dict(steps=4, lr=1e-3))
    assert pretrain.run(again, paths)["resumed_from_step"] == 4


def test_corrupt_checkpoint_names_the_folder(tmp_path):
    paths = Paths(tmp_path)
    write_curated(paths)
    params = make_params(train=dict(checkpoint_every=2), pretrain=dict(steps=4))
    pretrain.run(params, paths)
    newest = checkpoint.saved(paths.checkpoints("pretrain"))[-1]
    (newest / "model.safetensors").write_bytes(b"not a tensor file")
    longer = make_params(train=dict(checkpoint_every=2), pretrain=dict(steps=6))
    with pytest.raises(InputError, match=f"{newest}: cannot be loaded"):
        pretrain.run(longer, paths)
    (newest / checkpoint.STATE).write_text("{")
    with pytest.raises(InputError, match="trainer.json: unreadable"):
        pretrain.run(longer, paths)
    shutil.rmtree(newest)  # as the message says: the run resumes from the checkpoint before
    assert pretrain.run(longer, paths)["resumed_from_step"] == 2


def test_warm_start_begins_from_the_last_pretrain(tmp_path):
    paths = Paths(tmp_path)
    write_curated(paths)
    pretrain.run(make_params(pretrain=dict(steps=5)), paths)
    first = state(Denoiser.load(paths.model("pretrain")))
    write_curated(paths, n=6, shard="part-1", seed=5)  # new extra data
    # A one-step run at a negligible learning rate hands back the last pretrain's EMA weights, not a fresh init.
    pretrain.run(make_params(pretrain=dict(steps=1, lr=1e-12, warmup_steps=0, warm_start=True)), paths)
    warm = state(Denoiser.load(paths.model("pretrain")))
    assert all(torch.allclose(first[k], warm[k], atol=1e-6) for k in first)
    pretrain.run(make_params(pretrain=dict(steps=1, lr=1e-12, warmup_steps=0)), paths)
    cold = state(Denoiser.load(paths.model("pretrain")))
    assert not all(torch.allclose(first[k], cold[k], atol=1e-6) for k in first)
    # A different architecture cannot warm-start: the error names the switch.
    with pytest.raises(ParamsError, match="pretrain.warm_start"):
        pretrain.run(make_params(train=dict(condition_tokens=3), pretrain=dict(steps=1, warm_start=True)), paths)


def test_gradient_accumulation_draws_every_micro_batch(tmp_path):
    paths = Paths(tmp_path)
    write_curated(paths)
    summary = pretrain.run(
        make_params(train=dict(gradient_accumulation_steps=3, batch_size=4), pretrain=dict(steps=2)), paths
    )
    progress = checkpoint.read_progress(checkpoint.saved(paths.checkpoints("pretrain"))[-1])
    assert summary["steps"] == 2 and progress.position == 2 * 3 * 4


# ---------------------------------------------------------------- precision, params and inputs


def test_precision_is_fp32_on_cpu_and_bf16_can_be_asked_for(tmp_path):
    assert make_accelerator(make_params()).mixed_precision == "no"
    with pytest.raises(ParamsError, match="train.mixed_precision"):
        make_accelerator(make_params(train=dict(mixed_precision="fp16")))
    paths = Paths(tmp_path)
    write_curated(paths)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        summary = pretrain.run(make_params(train=dict(mixed_precision="bf16"), pretrain=dict(steps=2)), paths)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert math.isfinite(summary["final_loss"])
    assert all(v.dtype == torch.float32 for v in Denoiser.load(paths.model("pretrain")).state_dict().values())


@pytest.mark.parametrize(
    "train, field",
    [
        (dict(prediction_type="x0"), "train.prediction_type"),
        (dict(conditioning="words"), "train.conditioning"),
        (dict(train_text_encoder=True), "train: value error, train_text_encoder needs conditioning: tokens"),
        (dict(backbone="vit"), "train.backbone"),
        (dict(checkpoint_every=0), "train.checkpoint_every"),
        (dict(dit=dict(patch_size=0)), "train.dit.patch_size"),
        (dict(monitor_samples=1), "train.monitor_samples"),
        (dict(conditioning="tokens", unet=dict(text_injection="affine")), "unet.text_injection"),
        (dict(conditioning="tokens", backbone="rat"), "backbone: rat reads one sentence embedding"),
        (dict(rat=dict(num_groups=0)), "train.rat.num_groups"),
        (dict(num_processes=3, num_machines=2, main_process_ip="127.0.0.1"), "must be a multiple of num_machines"),
        (dict(num_processes=4, num_machines=2), "main_process_ip: machines 1 and up"),
    ],
)
def test_bad_params_name_the_field(train, field):
    with pytest.raises(ParamsError, match=field.replace(".", r"\.")):
        make_params(train=train)


@pytest.mark.parametrize(
    "train, field",
    [
        (dict(backbone="dit", dit=dict(patch_size=3)), "train.dit.patch_size"),
        (dict(backbone="rat", rat=dict(patch_size=3)), "train.rat.patch_size"),
        (dict(resolution=18, unet=dict(block_out_channels=[32, 32, 32])), "train.resolution"),
        (dict(vae="/nonexistent/vae"), "train.vae"),
    ],
)
def test_params_that_do_not_fit_the_model_name_the_field(tmp_path, train, field):
    paths = Paths(tmp_path)
    write_curated(paths)
    with pytest.raises(ParamsError, match=field):
        pretrain.run(make_params(train=train, pretrain=dict(steps=1)), paths)


def test_missing_inputs_name_the_path(tmp_path):
    paths, params = Paths(tmp_path), make_params()
    with pytest.raises(InputError, match="data/curated/shards"):
        pretrain.run(params, paths)
    with pytest.raises(InputError, match="models/pretrain"):
        finetune.run(params, paths)
    write_seed(paths, "train", 3)
    paths.embedding_file("seed_captions", "train").unlink()
    with pytest.raises(InputError, match="seed_captions/train.parquet"):
        load_seed(paths, "train", Encoding.create(paths, 8, "pooled"))
    write_curated(paths)
    paths.embedding_file("crawl_images", "part-0").unlink()
    with pytest.raises(InputError, match="no image embedding"):
        pretrain.run(make_params(train=dict(conditioning="image")), paths)
    with pytest.raises(InputError, match="models/clip"):
        pretrain.run(make_params(train=dict(conditioning="tokens")), paths)
