"""ShardedSearch on a local Ray cluster answers as search_regions does on the same cache; a dead
shard is restarted, or named with its cause — never a silently partial result."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from vfs import ShardedSearch, search_regions
from vfs.scoring import exact_scores

MASKS = {  # on the 4×4 grid
    "block": np.pad(np.ones((2, 2)), ((1, 1), (0, 2))),
    "soft row": np.array([[0, 0, 0, 0], [0.2, 1, 1, 0.5], [0, 0, 0, 0], [0, 0, 0, 0]]),
    "cell": np.pad(np.ones((1, 1)), ((3, 0), (3, 0))),
    "grid": np.ones((4, 4)),
}


@pytest.fixture(scope="module")
def sharded(cluster, reference):
    with ShardedSearch(reference.location, shards=2) as s:
        yield s


def assert_same_answer(got, want, cache) -> None:
    """The same ranked table; every other score is the in-process one or the exact one."""
    assert got.top.columns.tolist() == want.top.columns.tolist()
    assert got.top.equals(want.top), f"\n{got.top}\n{want.top}"
    exact = (
        exact_scores(cache.rows(np.arange(cache.n)), got.query).reshape(cache.n, -1).max(1).astype(np.float32)
    )
    assert ((got.scores == want.scores) | (got.scores == exact)).all()
    same = got.scores == want.scores
    assert (got.placements[same] == want.placements[same]).all()
    assert got.scores.shape == want.scores.shape and got.rescored >= want.rescored


@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
def test_masks_and_k(sharded, reference, mask):
    for k in (1, 5, 35):
        assert_same_answer(
            sharded.search(3, MASKS[mask], k=k, exclude=3),
            search_regions(reference, 3, MASKS[mask], k=k, exclude=3),
            reference,
        )


def test_filters_exclusions_and_domains(sharded, reference):
    labels = reference.manifest["label"].to_numpy()
    query = (
        reference.rows(np.array([10]))[0] * 0.5 + reference.rows(np.array([30]))[0] * 0.5
    )  # not a cache image
    for kwargs in (
        dict(k=4, candidates=labels == "a"),
        dict(k=6, per_domain=1),
        dict(k=7, per_domain=2, exclude=[0, 17, 18]),
        dict(k=3, candidates=labels == "b", per_domain=1, exclude=range(10)),
        dict(k=4, candidates=np.arange(reference.n) < 10),  # in one shard: the other's table is empty
    ):
        assert_same_answer(
            sharded.search(query, MASKS["block"], **kwargs),
            search_regions(reference, query, MASKS["block"], **kwargs),
            reference,
        )
    assert sharded.search(0, MASKS["cell"], k=3, candidates=np.zeros(reference.n, bool)).top.empty


def test_user_errors_come_back_as_themselves(sharded, reference):
    with pytest.raises(ValueError, match="k must be a whole number of results ≥ 1, not 0"):
        sharded.search(0, MASKS["block"], k=0)
    with pytest.raises(ValueError, match="outside 0..34"):
        sharded.search(35, MASKS["block"])
    with pytest.raises(ValueError, match="candidates must be a boolean array of length 35"):
        sharded.search(0, MASKS["block"], candidates=np.ones(3, bool))
    with pytest.raises(ValueError, match="shards must be 1..35"):
        ShardedSearch(reference.location, shards=36)


def test_top_only_placement_scores_and_memory(sharded, reference):
    got, want = (
        sharded.search(4, MASKS["block"], k=2, all_scores=False),
        search_regions(reference, 4, MASKS["block"], k=2),
    )
    assert (
        got.top.equals(want.top) and np.isnan(got.scores).sum() == reference.n - 4
    )  # the two shards' top-2s
    i = int(got.top["index"][0])
    assert got.scores[i] == want.scores[i] and (got.placements[i] == want.placements[i]).all()
    np.testing.assert_array_equal(got.placement_scores(i), want.placement_scores(i))
    status = sharded.status()
    assert [s["rows"] for s in status] == [(0, 18), (18, 35)]
    assert all(
        s["resident_bytes"] == (b - a) * 4 * 4 * (192 * 2 + 4) for s, (a, b) in zip(status, sharded.ranges)
    )


def test_a_killed_shard_is_restarted(sharded, reference):
    want = search_regions(reference, 7, MASKS["soft row"], k=5)
    os.kill(sharded.status()[1]["pid"], signal.SIGKILL)
    assert_same_answer(sharded.search(7, MASKS["soft row"], k=5), want, reference)


def test_all_exact_re_scores_every_image_in_every_shard(sharded, reference):
    """`all_exact=True` reaches the shards: every image's score is the float64 one, as in-process."""
    got = sharded.search(3, MASKS["soft row"], k=5, all_exact=True)
    exact = exact_scores(reference.rows(np.arange(reference.n)), got.query).reshape(reference.n, -1).max(1)
    np.testing.assert_allclose(got.scores, exact, rtol=0, atol=1e-6)
    assert got.rescored == reference.n
    assert got.top.equals(search_regions(reference, 3, MASKS["soft row"], k=5, all_exact=True).top)
