"""The `seed` stage: the embedded demo generator, the folder importer, and the curation-quality bench's scoring."""

from __future__ import annotations

import importlib.util
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from dextra.pipeline.demo import draw
from dextra.pipeline.demo.seed import seed_order
from dextra.pipeline.demo.web import KINDS
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import merged
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import (
    CURATED_SCHEMA,
    DECISION_SCHEMA,
    URL_SCHEMA,
    read_table,
    write_embeddings,
    write_table,
)
from dextra.pipeline.stages import seed
from dextra.pipeline.stages import urls as urls_stage
from tests.helpers import REPO, repo_params


def small_params(**overrides):
    return repo_params(**merged({"demo": {"n_seed": 60, "n_web": 120}}, overrides))


def make_root(root: Path) -> Paths:
    shutil.copytree(REPO / "manifests", root / "manifests")
    return Paths(root)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load_bench():
    spec = importlib.util.spec_from_file_location("curation_quality", REPO / "bench" / "curation_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    paths = make_root(tmp_path_factory.mktemp("demo"))
    summary = seed.run(small_params(), paths)
    return paths, summary


def test_same_params_give_the_same_bytes(tmp_path):
    paths = make_root(tmp_path)
    seed.run(small_params(), paths)
    first = snapshot(paths.seed)
    seed.run(small_params(), paths)
    assert snapshot(paths.seed) == first
    assert {"train.parquet", "test.parquet", "demo_web/urls.csv", "demo_web/truth.parquet"} <= set(first)
    seed.run(small_params(seed=1), paths)
    assert snapshot(paths.seed)["train.parquet"] != first["train.parquet"]


def test_the_demo_is_the_same_in_any_folder(tmp_path):
    """Same params, two checkouts: byte-identical data/seed and the same url_ids (nothing is fetched again)."""
    ids = []
    for name in ("one", "other/place"):
        paths = make_root(tmp_path / name)
        seed.run(small_params(), paths)
        urls_stage.run(small_params(), paths)
        table = read_table(paths.urls / "demo_web.parquet", URL_SCHEMA)
        ids.append(table["url_id"].to_pylist())
        assert all(Path(u.removeprefix("file://")).is_file() for u in table["url"].to_pylist()[:20])  # resolved here
        assert all(u.startswith(paths.demo_web.resolve().as_uri()) for u in table["url"].to_pylist())
    assert snapshot(tmp_path / "one" / "data" / "seed") == snapshot(tmp_path / "other" / "place" / "data" / "seed")
    assert ids[0] == ids[1] and len(set(ids[0])) == 120


def test_splits_are_disjoint_stratified_and_follow_the_schema(demo_run):
    paths, summary = demo_run
    train, test = (read_table(paths.seed_split(s)).to_pandas() for s in ("train", "test"))
    n_test = round(60 * small_params().demo.test_fraction)  # 18 at the demo's 0.3
    assert (summary["train"], summary["test"]) == (len(train), len(test)) == (60 - n_test, n_test)
    assert set(train.id).isdisjoint(test.id)
    assert sorted([*train.id, *test.id]) == [f"demo-{i:05d}" for i in range(60)]
    assert set(train.split) == {"train"} and set(test.split) == {"test"}
    per_class = Counter(train["class"]) + Counter(test["class"])
    for cls, n in per_class.items():
        assert abs((test["class"] == cls).sum() - 0.2 * n) < 1
    image = Image.open(io.BytesIO(train.image[0]))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    assert train.url.isna().all() and set(train.source) == {"demo"}


def test_captions_name_the_digit_and_colours_of_their_image(demo_run):
    paths, _ = demo_run
    table = read_table(paths.seed_split("train")).to_pandas()
    for row in table.to_dict("records"):
        assert 2 <= len(row["captions"]) <= 3
        parsed = {draw.parse_caption(c) for c in row["captions"]}
        assert len(parsed) == 1
        digit, fg = parsed.pop()
        assert digit == row["class"]
        pixels = np.asarray(Image.open(io.BytesIO(row["image"])), np.float32).reshape(-1, 3)
        assert np.linalg.norm(pixels - draw.COLORS[fg], axis=1).min() < 20
        bg = next(c for c in draw.COLORS if c != fg and c in row["captions"][0].split())
        assert np.linalg.norm(pixels - draw.COLORS[bg], axis=1).min() < 20


def test_the_web_has_every_kind_and_its_truth_holds(demo_run):
    paths, summary = demo_run
    web = paths.demo_web
    truth = pd.read_parquet(web / "truth.parquet")
    urls = pd.read_csv(web / "urls.csv", dtype=str, keep_default_na=False)
    assert list(urls.columns) == ["url", "text", "query", "class"]
    assert list(urls.url) == list(truth.url) and truth.url.is_unique
    assert list(urls["class"]) == list(truth.query_digit)
    assert list(urls["query"]) == [f"digit {d}" for d in truth.query_digit]
    counts = truth.kind.value_counts().to_dict()
    assert counts == summary["web_kinds"] and set(counts) == set(KINDS) and len(truth) == 120
    test_ids = set(read_table(paths.seed_split("test")).to_pandas().id)
    test_class = read_table(paths.seed_split("test")).to_pandas().set_index("id")["class"]
    by_url = truth.set_index("url")
    for row in truth.itertuples():
        path = web / row.path
        assert row.url == row.path  # relative to urls.csv, which the urls stage resolves
        if row.kind == "dead":
            assert not path.exists()
            continue
        data = path.read_bytes()
        if row.kind == "corrupt":
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data)).load()
            continue
        image = Image.open(io.BytesIO(data))
        assert image.size == (row.width, row.height)
        if row.kind == "in_domain":
            assert row.true_digit == row.query_digit
        elif row.kind == "wrong_class":
            assert row.true_digit != row.query_digit and row.true_digit is not None
        elif row.kind == "out_of_domain":
            assert row.true_digit is None
        elif row.kind == "leak":
            assert row.leak_of in test_ids and row.true_digit == test_class[row.leak_of]
        else:
            original = by_url.loc[row.duplicate_of]
            assert original.kind in ("in_domain", "wrong_class", "out_of_domain") and row.url != row.duplicate_of
            same = data == (web / original.path).read_bytes()
            assert same == (row.kind == "duplicate_exact")
            assert row.true_digit == original.true_digit and row.query_digit == original.query_digit


def make_folder(root: Path, rows: list[str]) -> Paths:
    paths = make_root(root)
    (paths.manifests / "mine.yaml").write_text("name: mine\nseed: {importer: folder, path: photos}\n")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(photos / "a.png")
    Image.new("L", (12, 12), 90).save(photos / "b.jpg")
    Image.new("RGB", (8, 16), (0, 0, 255)).save(photos / "sub" / "c.png")
    (photos / "captions.csv").write_text("\n".join(["filename,caption,class,split", *rows]) + "\n")
    return paths


def test_folder_importer_groups_captions_and_reencodes(tmp_path):
    paths = make_folder(
        tmp_path,
        [
            "a.png,a red box,box,",
            "b.jpg,grey square,square,",
            'a.png,"red, half clear",box,',
            "sub/c.png,a blue bar,bar,test",
        ],
    )
    summary = seed.run(small_params(dataset="mine"), paths)
    table = pd.concat([read_table(paths.seed_split(s)).to_pandas() for s in ("train", "test")]).set_index("id")
    assert sorted(table.index) == ["mine-a.png", "mine-b.jpg", "mine-sub/c.png"]
    assert list(table.loc["mine-a.png", "captions"]) == ["a red box", "red, half clear"]
    assert table.loc["mine-sub/c.png", "split"] == "test"
    assert sorted(table.split) == ["test", "test", "train"] and summary["test"] == 2
    for row in table.itertuples():
        image = Image.open(io.BytesIO(row.image))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (row.width, row.height))
    assert not paths.demo_web.exists()


def test_folder_importer_fails_whole_on_a_missing_image(tmp_path):
    paths = make_folder(tmp_path, ["a.png,a red box,box,", "missing.png,nothing,box,"])
    with pytest.raises(InputError, match="missing.png"):
        seed.run(small_params(dataset="mine"), paths)
    assert not paths.seed.exists()
    (tmp_path / "photos" / "captions.csv").write_text("filename,text\na.png,a red box\n")
    with pytest.raises(InputError, match=r"captions\.csv: missing column\(s\) caption"):
        seed.run(small_params(dataset="mine"), paths)
    assert not paths.seed.exists()


def test_bench_scores_a_known_table():
    bench = load_bench()
    kinds = [
        "in_domain",
        "in_domain",
        "in_domain",
        "duplicate_exact",
        "duplicate_near",
        "wrong_class",
        "out_of_domain",
        "leak",
        "leak",
        "dead",
        "corrupt",
        "out_of_domain",
        "in_domain",
    ]
    outcomes = [
        "kept",
        "kept",
        "distance",
        "kept",
        "kept",
        "kept",
        "distance",
        "leak",
        "kept",
        "fetch_error",
        "fetch_error",
        "leak",
        "distance",
    ]
    urls = [f"u{i}" for i in range(1, 14)]
    truth = pd.DataFrame(
        {
            "url": urls,
            "kind": kinds,
            "true_digit": ["3", "4", "7", "3", "7", "5", None, "1", "2", None, None, None, "0"],
            "fg_color": ["red", "blue", "white", "red", "white", "red", None, "red", "red", None, None, None, "black"],
            "bg_color": ["blue", "white", "black", "blue", "black", "blue", *[None] * 6, "white"],
            "duplicate_of": [None, None, None, "u1", "u3", *[None] * 8],
        }
    )
    decisions = pd.DataFrame({"url": [*urls, "file:///elsewhere"], "outcome": [*outcomes, "kept"]})
    curated = pd.DataFrame(
        {
            "url": ["u1", "u2", "u4", "u5", "u6", "u9"],
            "neighbor_captions": [
                ["a red 3 on a plain blue background", "digit five in green over blue dots"],
                [
                    "a red 4 on a plain white background",
                    "digit four in blue over plain white",
                    "a blue 9 on a plain red background",
                ],
                ["a green 3 on a dotted red background"],
                ["the number 7, white on black checks"],
                ["a red 8 on a plain blue background"],
                ["a red 2 on a plain blue background"],
            ],
            "neighbor_weights": [[0.7, 0.3], [0.6, 0.5, -0.2], [1.0], [1.0], [1.0], [1.0]],
            # read back as the nearest seed caption below: u1, u4 right; u2 the wrong background; u5 the wrong digit
            "text_embedding": [[0.9, 0.1, 0], [0.2, 0.8, 0.1], [1, 0, 0], [0, 0.3, 0.7], [1, 0, 0], [0, 1, 0]],
        }
    )
    seed_captions = (
        [
            "a red 3 on a plain blue background",
            "a blue 4 on a plain yellow background",
            "the number 1, white on plain black",
        ],
        np.eye(3, dtype=np.float32),
    )
    result = bench.score(truth, decisions, curated, seed_captions)
    assert result["kept"] == {"kept": 6, "true_positives": 3, "groups_to_keep": 4, "precision": 0.5, "recall": 0.75}
    assert result["baseline_keep_fetched"]["precision"] == pytest.approx(4 / 11)
    assert result["precision_vs_baseline"] == pytest.approx(0.5 / (4 / 11))
    assert result["extrapolation"] == {"images": 4, "class_accuracy": 1.0, "color_accuracy": 0.5, "both_accuracy": 0.5}
    assert result["condition"] == {"digit_accuracy": 0.75, "fg_accuracy": 1.0, "bg_accuracy": 0.75, "all_accuracy": 0.5}
    assert result["leak"] == {"leak_urls": 2, "kept": 1, "flagged": 1, "recall": 0.5, "false_alarms": 1}
    assert result["per_kind"]["in_domain"] == {"kept": 2, "distance": 2}
    assert result["decisions_not_in_truth"] == 1


def test_bench_reads_the_pipeline_files_and_explains_what_is_missing(demo_run, tmp_path, capsys):
    bench = load_bench()
    assert bench.main(["--root", str(tmp_path)]) == 1
    assert "truth.parquet: not found" in capsys.readouterr().err

    paths, _ = demo_run
    truth = pd.read_parquet(paths.demo_web / "truth.parquet")
    oracle = truth.kind.eq("in_domain")  # keep every in-domain original, nothing else
    outcome = np.where(oracle, "kept", np.where(truth.kind.isin(["dead", "corrupt"]), "fetch_error", "distance"))
    n = len(truth)
    given = {"url_id": [f"id{i}" for i in range(n)], "url": truth.url, "source": ["demo_web"] * n, "outcome": outcome}
    decisions = pa.table({f.name: given.get(f.name, pa.nulls(n, f.type)) for f in DECISION_SCHEMA})
    write_table(decisions, paths.decisions, DECISION_SCHEMA)
    kept = truth[oracle]
    captions = [
        f"a {fg} {d} on a plain {bg} background" for d, fg, bg in zip(kept.true_digit, kept.fg_color, kept.bg_color)
    ]
    one_hot = np.eye(len(kept), dtype=np.float32)  # each kept image's feature is exactly its own caption's
    assert bench.main(["--root", str(paths.root)]) == 1
    assert "seed_captions/train.parquet: not found" in capsys.readouterr().err
    write_embeddings(
        paths.embedding_file("seed_captions", "train"),
        [f"seed-{i}" for i in range(len(kept))],
        one_hot,
        {"caption": pa.array(captions)},
    )
    shard = pd.DataFrame(
        {
            "id": kept.url,
            "image": [b""] * len(kept),
            "width": 1,
            "height": 1,
            "captions": [[]] * len(kept),
            "split": "extra",
            "class": kept.query_digit,
            "source": "demo_web",
            "url": kept.url,
            "sha256": "",
            "text_embedding": list(one_hot.astype(np.float16)),
            "neighbor_ids": [["demo-00000"]] * len(kept),
            "neighbor_weights": [[1.0]] * len(kept),
            "neighbor_captions": [[c] for c in captions],
        }
    )
    shard = pa.Table.from_pandas(shard, schema=CURATED_SCHEMA, preserve_index=False)
    write_table(shard, paths.curated_shards / "0.parquet", CURATED_SCHEMA)
    assert bench.main(["--root", str(paths.root)]) == 0
    result = yaml.safe_load((paths.root / "bench" / "results" / "curation_quality.json").read_text())
    assert result["kept"]["precision"] == 1.0 and result["kept"]["recall"] == 1.0
    assert result["extrapolation"]["both_accuracy"] == 1.0 and result["leak"]["recall"] == 1.0
    assert result["condition"]["all_accuracy"] == 1.0
    assert "kept precision" in capsys.readouterr().out


def test_the_clip_corpus_is_captioned_and_shares_no_digit_sample_with_seed_or_web(demo_run):
    paths, summary = demo_run
    corpus = read_table(paths.seed_split("corpus")).to_pandas()
    assert summary["corpus"] == len(corpus) == small_params().demo.n_corpus
    assert set(corpus.split) == {"corpus"} and corpus.id.is_unique
    for row in corpus.to_dict("records"):
        assert {draw.parse_caption(c)[0] for c in row["captions"]} == {row["class"]}
        assert Image.open(io.BytesIO(row["image"])).size == (32, 32)
    seed_samples, web_samples, corpus_samples = seed_order(small_params())
    assert set(seed_samples).isdisjoint(web_samples) and set(web_samples).isdisjoint(corpus_samples)
    assert set(seed_samples).isdisjoint(corpus_samples) and len(corpus_samples) > 100
    truth = pd.read_parquet(paths.demo_web / "truth.parquet")
    drawn = {int(s.split(":")[1]) for s in truth["style"] if s.startswith(("digits:", "placed:"))}
    assert drawn and drawn <= set(web_samples)
