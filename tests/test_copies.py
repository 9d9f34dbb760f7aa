"""The web's kinds of copy (pipeline/demo/alterations.py) and the structure-map copy detector (filter/copies.py) on
the demo's own seed pictures: each family's copies are traced back to their original among other seed pictures."""

import numpy as np
import pytest
from PIL import Image

from dextra.filter.copies import CopyIndex, candidate_views, reference_views, structure_map
from dextra.pipeline.demo.alterations import FAMILIES, SINGLE, WEB_SIDE, alter
from dextra.pipeline.demo.seed import seed_images
from dextra.pipeline.params import load_params
from tests.helpers import REPO

REFERENCES = 12


@pytest.fixture(scope="module")
def pictures():
    params = load_params(REPO / "params.yaml")
    return [s.pixels for s in seed_images(params)[:REFERENCES]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_changes_the_picture_and_says_how(pictures, family):
    out, steps = alter(pictures[0], family, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if family == "combined":
        assert len(set(steps)) == 3 and set(steps) <= set(SINGLE)
    else:
        assert steps == [family]
    again, _ = alter(pictures[0], family, np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)  # the same draws give the same copy
    shown = np.asarray(Image.fromarray(pictures[0]).resize((WEB_SIDE, WEB_SIDE), Image.Resampling.BICUBIC))
    assert out.shape != shown.shape or np.abs(out.astype(int) - shown).mean() > 1


@pytest.mark.parametrize("family", SINGLE)
def test_copies_of_each_family_are_traced_to_their_original(pictures, family):
    index = CopyIndex([f"test-{i}" for i in range(len(pictures))], pictures)
    originals = [0, 5, 9]
    copies = [alter(pictures[i], family, np.random.default_rng([2, i]))[0] for i in originals]
    scores, owners = index.best(copies)
    assert owners.tolist() == originals, (family, scores)
    assert (scores > 0.85).all(), (family, scores)


def test_a_colour_change_keeps_the_map_and_a_picture_of_one_colour_has_none(pictures):
    picture = pictures[3]
    swapped = np.ascontiguousarray(picture[..., [2, 0, 1]])
    inverted = 255 - picture
    assert abs(structure_map(picture) @ structure_map(swapped)) > 0.99
    assert abs(structure_map(picture) @ structure_map(inverted)) > 0.99
    flat = np.full((20, 20, 3), 77, np.uint8)
    assert not structure_map(flat).any()
    assert np.isfinite(candidate_views(flat)).all()


def test_rotations_and_crops_are_in_the_reference_views(pictures):
    views = reference_views(pictures[2])
    assert views.shape[0] % 8 == 0  # every crop in its 8 rotations and mirror images
    np.testing.assert_allclose(np.linalg.norm(views, axis=1), 1, atol=1e-5)
    turned = np.ascontiguousarray(np.rot90(pictures[2]))
    assert (views @ structure_map(turned)).max() > 0.999


def test_without_references_nothing_is_a_copy(pictures):
    scores, owners = CopyIndex([], []).best(pictures[:2])
    assert owners.tolist() == [-1, -1] and (scores == -1).all()
