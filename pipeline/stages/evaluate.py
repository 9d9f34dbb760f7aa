"""`dextra evaluate`: sample images for seed test captions with the fine-tuned EMA model and score them
(train/metrics.py): CLIP-FD; Inception FID and Inception Score when evaluate.inception_weights names a local file,
and the fine-tuned Inception's FID and Inception Score (the CUB / Oxford papers' evaluator) when
evaluate.finetuned_inception does; CLIP score and CLIPScore (w = 2.5); and the GT CLIP scores of the real test
images at the generated resolution, the ceiling the CLIP model allows.

With evaluate.baseline the seed-only model of the `baseline` stage is sampled for the same captions from the same
noise and scored beside it: the paper's claim, that pretraining on the extrapolated extra set helps, measured on
this run's data. metrics/eval.json holds both and their difference (pretrain→finetune minus seed-only).

On the demo an independent judge (pipeline/demo/judge.py), trained here on images drawn for it and not on the
pipeline's CLIP, reads each sample's digit, foreground and background colour: caption_accuracy (all three as
captioned) and the per-attribute accuracies join each model's scores; gt_* are the judge's scores of the real test
images (its ceiling) and judge_heldout_* its accuracies on fresh drawn images.

A `conditioning: image` model is sampled from image embeddings that the prior (models/prior, `dextra prior`) draws
for the captions; the fine-tuned model is also sampled with the caption's text embedding in the image embedding's
place, and scored under text_embedding_directly: what the prior buys.
"""

from __future__ import annotations

from pathlib import Path

from dextra.filter.clip import create, load_clip
from dextra.pipeline.atomic import write_json
from dextra.pipeline.demo import judge as demo_judge
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.manifest import load_manifest
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_table
from dextra.train.metrics import (
    CLIPSCORE_W,
    FinetunedInception,
    TestPrompts,
    clip_frechet,
    clip_score,
    finetuned_inception_frechet,
    finetuned_inception_score,
    inception_frechet,
    inception_score,
    score,
)
from dextra.train.prior import load_prior, sample_prior
from dextra.train.sampling import generate, image_grid, load_model
from dvclive import Live

GRID_SAMPLES = 32
SEED_ONLY = "seed_only"
DIRECT = "text_embedding_directly"  # an image-conditioned model sampled without the prior


def local_file(paths: Paths, name: str | None, field: str, what: str) -> Path | None:
    if name is None:
        return None
    path = paths.root / name
    if not path.is_file():
        raise InputError(f"evaluate.{field}: {path} is not a file ({what})")
    return path


def run(params: Params, paths: Paths) -> dict:
    cfg = params.evaluate
    device = pick_device(params.device)
    inception = local_file(
        paths,
        cfg.inception_weights,
        "inception_weights",
        "torch-fidelity's Inception-v3 weights, e.g. weights-inception-2015-12-05-6726825d.pth",
    )
    finetuned = local_file(
        paths, cfg.finetuned_inception, "finetuned_inception", "an Inception-v3 state dict fine-tuned on the dataset"
    )
    folders = {"main": paths.model("finetune")}
    if cfg.baseline:
        folders[SEED_ONLY] = paths.model("baseline")
        if not (folders[SEED_ONLY] / "scheduler").is_dir():
            raise InputError(
                f"{folders[SEED_ONLY]}: no seed-only model (evaluate.baseline is true: run `dextra baseline` first)"
            )
    models = {label: load_model(folder, device) for label, folder in folders.items()}  # each loaded once
    main_model, _, resolution = models["main"]
    prompts = TestPrompts.load(paths, main_model.mode, resolution, cfg.num_samples, params.seed, main_model.tokenizer)
    bundle = load_clip(paths.clip, device)
    clipscore_bundle = bundle
    if cfg.clipscore_model is not None:
        clipscore_bundle = create(cfg.clipscore_model, cfg.clipscore_pretrained, device, "evaluate.clipscore_")
        clipscore_bundle.model.eval()
    image_metrics = {"clip_fd": clip_frechet(bundle, prompts.real, cfg.batch_size)}
    if inception is not None:
        image_metrics["fid"] = inception_frechet(inception, prompts.real, cfg.batch_size, device)
        image_metrics["inception_score"] = inception_score(inception, cfg.batch_size, device)
    if finetuned is not None:
        network = FinetunedInception(finetuned)  # one network for both metrics
        image_metrics["fid_finetuned"] = finetuned_inception_frechet(network, prompts.real, cfg.batch_size, device)
        image_metrics["inception_score_finetuned"] = finetuned_inception_score(network, cfg.batch_size, device)

    judge, judge_heldout = None, {}
    if paths.manifest(params.dataset).exists() and load_manifest(params.dataset, paths).seed.importer == "demo":
        test_ids = read_table(paths.seed_split("test"), columns=["id"]).column("id").to_pylist()
        exclude = demo_judge.seed_test_samples(params, test_ids)
        judge, judge_heldout = demo_judge.cached_judge(params, exclude, paths.train_cache)

    conditions = prompts.conditions
    runs = [(label, label) for label in folders]  # (scores' label, model's label)
    if main_model.mode == "image":
        prior, prior_scheduler = load_prior(paths.model("prior"), device)
        drawn = sample_prior(
            prior, prior_scheduler, conditions, params.prior.sampling_steps, params.seed, params.prior.candidates
        )
        conditions = drawn.cpu().to(prompts.conditions.dtype)
        runs.append((DIRECT, "main"))
    scores, grids = {}, {}
    for label, model_label in runs:
        model, vae, _ = models[model_label]
        sampled_from = prompts.conditions if label == DIRECT else conditions
        generated = generate(model, vae, folders[model_label], sampled_from, cfg, params.seed, label)
        scores[label] = score(image_metrics, bundle, clipscore_bundle, prompts, generated, cfg.batch_size)
        if judge is not None:
            scores[label] |= demo_judge.judge_scores(judge, generated, prompts.captions)
        grids[label] = image_grid(generated[:GRID_SAMPLES], prompts.captions[:GRID_SAMPLES])
    main = scores["main"]
    summary = {
        **main,
        "gt_clip_score": clip_score(bundle, prompts.real[prompts.image_index], prompts.captions, cfg.batch_size),
        "gt_clipscore": clip_score(
            clipscore_bundle, prompts.real[prompts.image_index], prompts.captions, cfg.batch_size, CLIPSCORE_W
        ),
    }
    if judge is not None:  # the judge's ceiling (the real test images) and its accuracy on fresh drawn images
        real = demo_judge.judge_scores(judge, prompts.real[prompts.image_index], prompts.captions)
        summary |= {f"gt_{name}": value for name, value in real.items()}
        summary |= {f"judge_heldout_{name}": value for name, value in judge_heldout.items()}
    if SEED_ONLY in scores:
        summary[SEED_ONLY] = scores[SEED_ONLY]
        summary["difference"] = {name: main[name] - value for name, value in scores[SEED_ONLY].items()}
    if DIRECT in scores:
        summary[DIRECT] = scores[DIRECT]

    with Live(dir=str(paths.live("evaluate")), save_dvc_exp=False, dvcyaml=None) as live:
        for name, value in summary.items():
            if not isinstance(value, dict):
                live.log_metric(name, value, plot=False)
        for label, grid in grids.items():
            live.log_image("samples.png" if label == "main" else f"samples_{label}.png", grid)
    summary = _rounded(summary) | {"num_samples": cfg.num_samples, "guidance_scale": cfg.guidance_scale}
    write_json(paths.eval_metrics, summary)
    return summary


def _rounded(values: dict) -> dict:
    return {k: _rounded(v) if isinstance(v, dict) else round(v, 5) for k, v in values.items()}
