"""Curate on hand-built embeddings and images, so every decision and extrapolation has a known answer."""

import itertools

import imagehash
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps

from dextra.filter import curate
from dextra.filter.dedup import (
    CROP_FRACTIONS,
    LeakBank,
    crop_bank,
    exact_duplicates,
    hamming,
    near_duplicates,
    phash,
    phashes,
)
from dextra.filter.detectors import SeedClassifier, cluster_detector, seed_spread_threshold
from dextra.filter.extrapolate import extrapolate
from dextra.filter.index import build_index, describe, search
from dextra.pipeline import prune as prune_command
from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_SCHEMA, DECISION_SCHEMA, STATUS_SCHEMA, URL_SCHEMA, read_table, write_table
from dextra.pipeline.stages import curate as curate_stage
from dextra.pipeline.stages import report as report_stage
from tests.helpers.curate import DIM, EVERY_DETECTOR, blocks, build_fixture, copy_of, encode, unit


def test_extrapolation_recovers_known_weights():
    # Orthonormal neighbours: (F Fᵀ + λI) = (1 + λ) I, so w = w_true / (1 + λ) exactly.
    k, ridge = 3, 0.1
    neighbors = torch.eye(k, DIM).unsqueeze(0)
    w_true = torch.tensor([[0.5, 0.3, 0.2]])
    target = (w_true.unsqueeze(-1) * neighbors).sum(1)
    texts = torch.eye(k, DIM).roll(5, dims=1).unsqueeze(0)
    weights, text = extrapolate(neighbors, target, texts, ridge)
    torch.testing.assert_close(weights, w_true / (1 + ridge))
    torch.testing.assert_close(text, torch.nn.functional.normalize((w_true.unsqueeze(-1) * texts).sum(1), dim=-1))


def test_batched_extrapolation_matches_lstsq_per_image():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(7, 4, DIM))
    f = rng.normal(size=(7, DIM))
    weights, _ = extrapolate(torch.tensor(F), torch.tensor(f), torch.tensor(F), ridge=0.0)
    for i in range(7):
        expected, *_ = np.linalg.lstsq(F[i].T, f[i], rcond=None)
        np.testing.assert_allclose(weights[i].numpy(), expected, rtol=1e-6, atol=1e-8)


def test_index_is_chosen_by_size_and_finds_neighbours():
    assert describe(1000, 512, exact_max=5000, memory_budget_bytes=1 << 30) == "Flat"
    assert describe(1_000_000, 512, exact_max=5000, memory_budget_bytes=2 << 30).startswith("IVF1024,SQfp16")
    assert "PQ64x8" in describe(10_000_000, 512, exact_max=5000, memory_budget_bytes=2 << 30)
    vectors = unit(np.random.default_rng(0).normal(size=(3000, DIM)))
    for exact_max in (10_000, 100):  # flat, then IVF
        scores, rows = search(build_index(vectors, exact_max=exact_max, nprobe=64), vectors[:50], 1)
        assert (rows[:, 0] == np.arange(50)).mean() >= 0.95 and scores[:, 0].min() > 0.99


def test_seed_threshold_is_the_seed_own_percentile():
    seed = unit(np.random.default_rng(1).normal(size=(50, DIM)))
    index = build_index(seed)
    low, high = seed_spread_threshold(index, seed, 3, 5), seed_spread_threshold(index, seed, 3, 95)
    scores, _ = search(index, seed, 4)
    assert low == pytest.approx(np.percentile(scores[:, 1:].mean(1), 5)) and low < high


def test_cluster_detector_separates_an_off_topic_cluster():
    rng = np.random.default_rng(2)
    centre, other = np.eye(DIM)[0], np.eye(DIM)[7]
    seed = unit(centre + 0.1 * rng.normal(size=(40, DIM)))
    crawl = unit(np.concatenate([centre + 0.1 * rng.normal(size=(20, DIM)), other + 0.1 * rng.normal(size=(20, DIM))]))
    labels, similarity = cluster_detector(
        crawl, np.arange(40), ["q"] * 40, build_index(seed), 5, clusters_per_query=2, min_cluster_size=5, seed=0
    )
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]
    assert similarity[:20].min() > 0.8 and similarity[20:].max() < 0.3


def test_class_detector_predicts_the_seed_class():
    rng = np.random.default_rng(3)
    centres = np.eye(3, DIM)
    seed = unit(centres[np.arange(60) % 3] + 0.1 * rng.normal(size=(60, DIM)))
    detector = SeedClassifier(seed, [str(i % 3) for i in range(60)], regularisation=10, random_state=0)
    predicted, confidence = detector.predict(unit(centres + 0.05 * rng.normal(size=(3, DIM))))
    assert predicted.tolist() == ["0", "1", "2"] and confidence.min() > 0.5


def test_batched_phash_gives_imagehash_bits():
    rng = np.random.default_rng(0)
    images = [blocks(i, size) for i, size in enumerate((8, 31, 32, 48, 97))]
    images += [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 50), (64, 64), (300, 120))
    ]
    images += [Image.new("RGB", (32, 32), (120, 30, 200)), copy_of(blocks(9))]  # flat: every coefficient ties
    grays = [image.convert("L") for image in images]
    expected = np.stack([np.packbits(imagehash.phash(g).hash.flatten()) for g in grays])
    assert np.array_equal(phashes(grays), expected)
    assert [phash(encode(image)) for image in images] == [row.tobytes() for row in expected]
    assert phashes([]).shape == (0, 8)


def test_leak_bank_finds_transformed_copies_only():
    tests = [blocks(i) for i in range(5)]
    bank = LeakBank([f"t{i}" for i in range(5)], [encode(t) for t in tests])
    closest, matched = bank.matches([phash(encode(copy_of(tests[3]), "JPEG", 60)), phash(encode(blocks(99)))], 8)
    assert closest[0] <= 8 and matched[0].tolist() == [3]
    assert closest[1] > 16 and matched[1].tolist() == []


def test_crop_bank_hashes_are_those_of_the_cropped_resized_mirrored_pictures():
    for picture in (blocks(3), blocks(4, 40).resize((40, 52)), blocks(5, 32)):
        gray, (w, h) = picture.convert("L"), picture.size
        crops = [
            gray.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))
            for left, top, right, bottom in itertools.product(CROP_FRACTIONS, repeat=4)
        ]
        by_pil = phashes(crops + [ImageOps.mirror(c) for c in crops])
        distance = hamming(crop_bank(encode(picture)), by_pil)
        assert len(distance) == 162 and np.median(distance) == 0 and (distance <= 2).mean() >= 0.95, distance


def test_leak_bank_returns_every_test_image_within_reach():
    twin = blocks(7)
    bank = LeakBank(["a", "b", "c"], [encode(twin), encode(blocks(8)), encode(twin, "JPEG", 90)])
    closest, matched = bank.matches([phash(encode(twin))], 4)
    assert closest[0] == 0 and matched[0].tolist() == [0, 2]  # CLIP decides between look-alikes


def test_duplicates_exact_and_near():
    assert exact_duplicates(["a", "b", "c"], ["x", "y", "x"]) == {"c": "a"}
    originals = [blocks(10 + i) for i in range(3)]
    images = [
        encode(originals[0]),
        encode(originals[1]),
        encode(originals[0].crop((2, 2, 46, 44)).resize((64, 64))),
        encode(originals[2]),
        encode(originals[2], "JPEG", 60),
    ]
    neighbours = np.array([[2, 1], [0, 3], [0, 1], [1, 4], [3, 0]])
    similarities = np.full((5, 2), 0.95)  # CLIP calls every pair a candidate; the hashes or the check tell copies apart
    asked = []

    def confirm(pairs):
        asked.append(pairs.tolist())
        return np.array([tuple(p) == (0, 2) for p in pairs.tolist()])  # the crop, as alignment would find it

    hashes = [phash(b) for b in images]
    found = near_duplicates(list("abcde"), neighbours, similarities, 0.9, hashes, 2, confirm)
    assert found == {"c": "a", "e": "d"}
    # asked once, for every pair whose hashes differ, earlier member first: the recompressed copy's hashes agree
    assert sorted(map(tuple, asked[0])) == [(0, 1), (0, 2), (0, 4), (1, 2), (1, 3)] and len(asked) == 1
    assert near_duplicates(list("abcde"), neighbours, similarities, 0.99, hashes, 2, confirm) == {}
    # without a check, CLIP alone decides; a later rank makes the other member the one kept
    assert near_duplicates(list("ab"), np.array([[1], [0]]), np.full((2, 1), 0.95), 0.9, None, 2, None) == {"b": "a"}
    ranked = near_duplicates(
        list("ab"), np.array([[1], [0]]), np.full((2, 1), 0.95), 0.9, None, 2, None, np.array([1, 0])
    )
    assert ranked == {"a": "b"}
    assert hamming(np.frombuffer(phash(images[0]), np.uint8), np.frombuffer(phash(images[2]), np.uint8)) > 2


def test_decisions_and_extrapolation_on_known_fixture(tmp_path, make_params):
    paths, caption_features = build_fixture(tmp_path)
    params = make_params(curate=EVERY_DETECTOR)
    summary = curate_stage.run(params, paths)

    decisions = {r["url_id"]: r for r in read_table(paths.decisions, DECISION_SCHEMA).to_pylist()}
    outcomes = {u: d["outcome"] for u, d in decisions.items()}
    assert outcomes == {
        "a_near0": "kept",
        "b_near1": "kept",
        "c_wrong": "class",
        "d_leak": "leak",
        "e_exact": "duplicate",
        "f_near": "duplicate",
        "g_err": "fetch_error",
        "h_ref": "refused",
        "i_optout": "refused",
        **{f"x_off{i}": "cluster" for i in range(6)},
    }
    assert decisions["e_exact"]["duplicate_of"] == "a_near0" and decisions["f_near"]["duplicate_of"] == "a_near0"
    assert decisions["d_leak"]["leak_of"] == "t2" and decisions["d_leak"]["leak_copy_score"] >= 0.94
    assert decisions["c_wrong"]["predicted_class"] == "0"
    assert decisions["g_err"]["detail"] == "error because"
    assert summary["outcomes"]["kept"] == 2 and "cluster" in summary["thresholds"]

    kept = read_table(paths.curated_shards / "run0001-00000.parquet", CURATED_SCHEMA).to_pylist()
    assert sorted(r["id"] for r in kept) == ["a_near0", "b_near1"]
    for row in kept:
        cluster = int(row["id"][-1])
        assert all(int(n[1:]) % 3 == cluster for n in row["neighbor_ids"])
        assert len(row["neighbor_weights"]) == 3 and len(row["neighbor_captions"]) == 3
        # The extrapolated text feature lands on the neighbours' caption feature.
        assert float(np.dot(np.asarray(row["text_embedding"], np.float32), caption_features[cluster])) > 0.95


def test_detectors_can_be_switched_off(tmp_path, make_params):
    paths, _ = build_fixture(tmp_path)
    curate_stage.run(
        make_params(
            curate={
                "k_neighbors": 3,
                "seed_k": 3,
                "cluster_detector": False,
                "class_detector": False,
                "distance_detector": "off",
            }
        ),
        paths,
    )
    outcomes = {r["url_id"]: r["outcome"] for r in read_table(paths.decisions, DECISION_SCHEMA).to_pylist()}
    assert outcomes["c_wrong"] == "kept" and outcomes["x_off0"] == "kept" and outcomes["d_leak"] == "leak"


def test_everything_dropped_leaves_empty_curated_shards(tmp_path, make_params):
    paths, _ = build_fixture(tmp_path)
    summary = curate_stage.run(
        make_params(
            curate={"seed_k": 3, "class_detector": True, "min_class_confidence": 1.0, "cluster_detector": False}
        ),
        paths,
    )
    assert "kept" not in summary["outcomes"]
    assert read_table(paths.curated_shards / "run0001-00000.parquet", CURATED_SCHEMA).num_rows == 0


def test_missing_inputs_name_the_file(tmp_path, make_params):
    with pytest.raises(InputError, match="status.parquet: not found"):
        curate_stage.run(make_params(), Paths(tmp_path))
    paths, _ = build_fixture(tmp_path)
    paths.embedding_file("crawl_images", "run0001-00000").unlink()
    with pytest.raises(InputError, match="no embedding for crawled image"):
        curate_stage.run(make_params(), paths)
    assert not paths.decisions.exists()


def test_urls_no_list_names_leave_the_extra_set_and_come_back(tmp_path, make_params):
    """A list shrinks (a source removed, a URL edited away): curate decides over what is listed now, the report counts
    the rest, their images stay for when a list names them again, and `dextra prune` deletes them."""
    paths, _ = build_fixture(tmp_path)
    params = make_params(curate=EVERY_DETECTOR)
    everything = read_table(paths.urls / "web.parquet", URL_SCHEMA)
    gone = {"b_near1", "g_err"}
    write_table(everything.filter(pa.array([u not in gone for u in everything["url_id"].to_pylist()])),
                paths.urls / "web.parquet", URL_SCHEMA)  # fmt: skip
    summary = curate_stage.run(params, paths)
    decisions = read_table(paths.decisions, DECISION_SCHEMA).to_pylist()
    assert summary["unlisted"] == 2 and not gone & {r["url_id"] for r in decisions}
    kept = read_table(paths.curated_shards / "run0001-00000.parquet", CURATED_SCHEMA)["id"].to_pylist()
    assert kept == ["a_near0"]
    report_stage.run(params, paths)
    assert "2 fetched URLs are in no list now" in paths.report_page.read_text()

    write_table(everything, paths.urls / "web.parquet", URL_SCHEMA)  # listed again: back without a fetch
    assert curate_stage.run(params, paths)["unlisted"] == 0
    assert "b_near1" in read_table(paths.curated_shards / "run0001-00000.parquet", CURATED_SCHEMA)["id"].to_pylist()

    write_table(everything.filter(pa.array([u not in gone for u in everything["url_id"].to_pylist()])),
                paths.urls / "web.parquet", URL_SCHEMA)  # fmt: skip
    before = read_table(paths.crawl_shards / "run0001-00000.parquet").num_rows
    assert prune_command.run(params, paths) == {"pruned": 2, "shards_rewritten": 1}
    status = read_table(paths.crawl_status, STATUS_SCHEMA)["url_id"].to_pylist()
    assert not gone & set(status) and len(status) == len(everything) - 2
    after = read_table(paths.crawl_shards / "run0001-00000.parquet")
    assert after.num_rows == before - 1 and "b_near1" not in after["id"].to_pylist()  # g_err had no image
    assert prune_command.run(params, paths) == {"pruned": 0, "shards_rewritten": 0}


def synthetic_core_inputs(n_crawl: int = 4000, n_seed: int = 400, dim: int = 64):
    """Seed images in 8 classes and a crawl with in-domain, wrong-class and off-topic images and near copies,
    large enough that faiss searches through BLAS. The off-topic images share one vector: many exact ties."""
    rng = np.random.default_rng(5)
    centres = unit(rng.normal(size=(8, dim)))
    seed_classes = np.arange(n_seed) % 8
    seed = curate.SeedSet(
        train_ids=[f"s{i}" for i in range(n_seed)],
        train_vectors=unit(centres[seed_classes] + 0.3 * rng.normal(size=(n_seed, dim))),
        train_classes=[str(c) for c in seed_classes],
        caption_features=unit(rng.normal(size=(n_seed, dim))),
        first_captions=[f"class {c}" for c in seed_classes],
        test_ids=[f"t{i}" for i in range(40)],
        test_vectors=unit(centres[np.arange(40) % 8] + 0.3 * rng.normal(size=(40, dim))),
        test_images=None,
    )
    query_class = rng.integers(0, 8, n_crawl)
    shown = np.where(rng.random(n_crawl) < 0.2, rng.integers(0, 8, n_crawl), query_class)
    vectors = centres[shown] + 0.3 * rng.normal(size=(n_crawl, dim))
    vectors[rng.random(n_crawl) < 0.2] = rng.normal(size=dim)
    copies = np.flatnonzero(rng.random(n_crawl) < 0.1)
    vectors[copies] = vectors[copies - 1] + 0.05 * rng.normal(size=(len(copies), dim))
    crawl = curate.Crawl(
        ids=[f"c{i:05d}" for i in range(n_crawl)],
        vectors=unit(vectors).astype(np.float16),
        queries=[f"class {c}" for c in query_class],
        classes=[str(c) for c in query_class],
        digests=[str(i) for i in range(n_crawl)],
        hashes=None,
        read_images=None,
        urls=[f"http://web.example/{i:05d}.jpg" for i in range(n_crawl)],
    )
    return seed, crawl


@pytest.mark.parametrize("exact_index_max", [100_000, 300])  # exact indexes; IVF seed index and seed-filed crawl lists
def test_curate_is_identical_whatever_the_thread_count(make_params, exact_index_max):
    import faiss

    seed, crawl = synthetic_core_inputs()
    cfg = make_params(
        curate={
            "cluster_detector": True,
            "class_detector": True,
            "distance_detector": "on",
            "exact_index_max": exact_index_max,
        }
    ).curate
    faiss_threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            torch.set_num_threads(threads)
            runs.append(curate.curate(seed, crawl, cfg, 0, torch.device("cpu")))
    finally:
        faiss.omp_set_num_threads(faiss_threads)
        torch.set_num_threads(torch_threads)
    (one, extra_one, thresholds_one), (two, extra_two, thresholds_two) = runs
    assert thresholds_one == thresholds_two
    assert (
        len(set(one.outcome)) >= 4
    )  # kept, duplicate, class and distance or cluster: every detector decided something
    for name in vars(one):  # every decision and score, bit for bit
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name), err_msg=name)
    for name in vars(extra_one):
        np.testing.assert_array_equal(getattr(extra_one, name), getattr(extra_two, name), err_msg=name)


def test_curate_does_not_depend_on_row_order(make_params):
    """Rows are sorted by url_id, a hash of the URL: the demo's file:// URLs in another folder shuffle them."""
    seed, crawl = synthetic_core_inputs()
    cfg = make_params(
        curate={"cluster_detector": True, "class_detector": True, "distance_detector": "on", "exact_index_max": 300}
    ).curate
    shuffled = np.random.default_rng(0).permutation(len(crawl.ids))
    moved = curate.Crawl(
        ids=[crawl.ids[r] for r in shuffled],
        vectors=crawl.vectors[shuffled],
        queries=[crawl.queries[r] for r in shuffled],
        classes=[crawl.classes[r] for r in shuffled],
        digests=[crawl.digests[r] for r in shuffled],
        hashes=None,
        read_images=None,
        urls=[crawl.urls[r] for r in shuffled],
    )
    one, extra_one, _ = curate.curate(seed, crawl, cfg, 0, torch.device("cpu"))
    two, extra_two, _ = curate.curate(seed, moved, cfg, 0, torch.device("cpu"))
    assert (one.outcome == "duplicate").sum() > 0 and len(set(one.cluster) - {None}) > 8
    for name in vars(one):
        np.testing.assert_array_equal(getattr(one, name)[shuffled], getattr(two, name), err_msg=name)
    kept_one = {
        crawl.ids[r]: (tuple(n), w.tobytes())
        for r, n, w in zip(extra_one.rows, extra_one.neighbor_rows, extra_one.weights)
    }
    kept_two = {
        moved.ids[r]: (tuple(n), w.tobytes())
        for r, n, w in zip(extra_two.rows, extra_two.neighbor_rows, extra_two.weights)
    }
    assert kept_one == kept_two


def test_crawl_lists_find_the_near_copies_exact_search_finds(make_params, monkeypatch):
    """Above exact_index_max, crawled images are filed under their two nearest seed images: nearly every image with a
    near copy (the near-duplicate detector's candidates) finds one as close as exact search does, and the same one
    with the lists held in one part or in several. (Which of several tied copies is listed may differ: the off-topic
    images are one vector.)"""
    seed, crawl = synthetic_core_inputs()
    rows = np.arange(len(crawl.ids))
    _, seed_neighbors = search(build_index(seed.train_vectors), crawl.vectors, 6)  # nprobe 4, + 2

    def closest_other(exact_index_max: int) -> np.ndarray:
        cfg = make_params(curate={"exact_index_max": exact_index_max}).curate
        scores, neighbors = curate._crawl_neighbors(crawl.vectors, rows, len(seed.train_ids), seed_neighbors, cfg)
        return np.where(neighbors != rows[:, None], scores, -1).max(axis=1)

    exact = closest_other(100_000)
    copies = exact >= 0.9
    assert copies.sum() > 200
    listed = closest_other(300)
    assert np.isclose(listed[copies], exact[copies], rtol=1e-5).mean() >= 0.99
    monkeypatch.setattr(curate, "LIST_ROWS", 1000)  # four parts, merged
    np.testing.assert_array_equal(closest_other(300), listed)


def test_seed_search_is_approximate_only_when_exact_would_compare_too_many_pairs(monkeypatch):
    from dextra.filter import index

    vectors = unit(np.random.default_rng(0).normal(size=(3000, DIM)))
    assert index.faiss.try_extract_index_ivf(build_index(vectors, exact_max=10_000, queries=1_000_000)) is None
    monkeypatch.setattr(index, "EXACT_PAIRS", 3000 * 999)
    assert index.faiss.try_extract_index_ivf(build_index(vectors, exact_max=10_000, queries=1000)) is not None
    scores, rows = search(build_index(vectors, exact_max=10_000, nprobe=64, queries=1000), vectors[:50], 1)
    assert (rows[:, 0] == np.arange(50)).mean() >= 0.95 and scores[:, 0].min() > 0.99


def test_extrapolated_texts_go_to_a_mapped_file_in_scratch(make_params, tmp_path):
    seed, crawl = synthetic_core_inputs(n_crawl=1000)
    cfg = make_params().curate
    _, in_memory, _ = curate.curate(seed, crawl, cfg, 0, torch.device("cpu"))
    _, mapped, _ = curate.curate(seed, crawl, cfg, 0, torch.device("cpu"), scratch=tmp_path)
    assert isinstance(mapped.text, np.memmap) and (tmp_path / "kept_texts.npy").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "kept_texts.npy"), in_memory.text)
    assert len(in_memory.rows) > 100
