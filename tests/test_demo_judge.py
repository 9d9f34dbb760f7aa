"""The demo's independent judge reads digits and colours of images it never trained on, and scores a sample against
its caption: right captions score high, shuffled ones near zero, noise near zero."""

from __future__ import annotations

import pytest
import torch

from dextra.pipeline.demo import judge
from dextra.pipeline.demo.seed import seed_images
from tests.helpers import repo_params


@pytest.fixture(scope="module")
def trained():
    params = repo_params(demo={"n_seed": 300})
    images = seed_images(params)
    held_out = [s.id for s in images[:150]]
    model, heldout = judge.train_judge(params, judge.seed_test_samples(params, held_out))
    return params, model, heldout, images[:150]


def test_caption_labels_name_digit_and_both_colours():
    labels = judge.caption_labels(["a red 3 on a striped green background", "digit seven in white over blue dots", "x"])
    names = list(judge.COLORS)
    assert labels.tolist() == [
        [3, names.index("red"), names.index("green")],
        [7, names.index("white"), names.index("blue")],
        [-1, -1, -1],
    ]


def test_the_judge_never_draws_an_excluded_sample(make_params):
    params = make_params()
    everything_but_one = set(range(1797)) - {5}
    _, labels = judge.judge_images(params, 20, everything_but_one, judge.TRAIN_PURPOSE)
    from dextra.pipeline.demo.seed import digits

    assert set(labels[:, 0].tolist()) == {int(digits()[1][5])}


def test_the_judge_reads_images_it_never_saw(trained):
    params, model, heldout, unseen = trained
    assert heldout["fg_accuracy"] > 0.95 and heldout["bg_accuracy"] > 0.95 and heldout["digit_accuracy"] > 0.6
    pixels = torch.stack([torch.from_numpy(s.pixels).permute(2, 0, 1).float() / 255 for s in unseen])
    captions = [s.captions[0] for s in unseen]
    right = judge.judge_scores(model, pixels, captions)
    shuffled = judge.judge_scores(model, pixels, captions[1:] + captions[:1])
    noise = judge.judge_scores(model, torch.rand_like(pixels), captions)
    assert right["caption_accuracy"] > 0.6 and right["fg_accuracy"] > 0.95 and right["bg_accuracy"] > 0.95
    assert shuffled["caption_accuracy"] < 0.1 and noise["caption_accuracy"] < 0.1


def test_a_cached_judge_is_the_same_judge(trained, tmp_path, monkeypatch):
    params, model, heldout, unseen = trained
    trainings = []
    monkeypatch.setattr(judge, "train_judge", lambda *args: trainings.append(args) or (model, heldout))
    exclude = judge.seed_test_samples(params, [s.id for s in unseen])
    first, first_heldout = judge.cached_judge(params, exclude, tmp_path)
    again, again_heldout = judge.cached_judge(params, exclude, tmp_path)
    assert len(trainings) == 1 and first_heldout == again_heldout == heldout
    assert len(list(tmp_path.glob("judge-*.pt"))) == 1
    pixels = torch.rand(8, 3, 16, 16)
    assert torch.equal(judge.predict(model, pixels), judge.predict(again, pixels))
    judge.cached_judge(params.model_copy(update={"seed": params.seed + 1}), exclude, tmp_path)
    assert len(trainings) == 2 and len(list(tmp_path.glob("judge-*.pt"))) == 2  # another seed, another judge
