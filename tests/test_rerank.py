"""The FoL re-ranking score against a literal reading of docs/METHOD.md section 5."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin import mutual_match_scores
from fol_plugin.rerank import batched_match_scores, mutual_matches, reference_match_scores
from fol_plugin.host import PRODUCT_ENV, SCREEN_PRODUCTS
from fol_plugin.rerank import kernels, keys
from fol_plugin.rerank.engine import bf16_error_bound
from fol_plugin.rerank.keys import KEY_VALUES


@pytest.fixture(autouse=True, params=SCREEN_PRODUCTS)
def screen(request, monkeypatch) -> str:
    """Every test here runs on each screen product the engine can use (bf16 and float32)."""
    monkeypatch.setenv(PRODUCT_ENV, request.param)
    return request.param


def reference_score(query: np.ndarray, candidate: np.ndarray, threshold: float = 0.7) -> int:
    """Spec section 5 with explicit loops, in float64."""
    similarity = candidate.astype(np.float64) @ query.astype(np.float64).T  # [m, n]
    count = 0
    for j in range(query.shape[0]):
        i = int(np.argmax(similarity[:, j]))
        if int(np.argmax(similarity[i, :])) == j and similarity[i, j] > threshold:
            count += 1
    return count


def correlated_descriptors(generator: torch.Generator, n: int, base: torch.Tensor, noise: float) -> torch.Tensor:
    picks = torch.randint(len(base), (n,), generator=generator)
    return F.normalize(base[picks] + noise * torch.randn(n, base.shape[1], generator=generator), dim=-1)


def test_scores_match_the_literal_definition():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(300, 128, generator=generator)
    query = correlated_descriptors(generator, 250, base, 0.4)
    candidates = [correlated_descriptors(generator, m, base, noise) for m, noise in [(200, 0.4), (310, 0.8), (50, 0.3)]]
    scores = mutual_match_scores(query, candidates)
    expected = [reference_score(query.numpy(), c.numpy()) for c in candidates]
    assert scores.tolist() == expected
    assert scores.dtype == torch.float32 and expected[0] > 0


def test_threshold_is_strict():
    query = torch.tensor([[1.0, 0.0]])
    candidate = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)  # cosine 0.7071...
    assert mutual_match_scores(query, [candidate], threshold=0.7).item() == 1
    assert mutual_match_scores(query, [candidate], threshold=0.75).item() == 0


def test_only_mutual_matches_count():
    query = F.normalize(torch.tensor([[1.0, 0.05], [1.0, -0.05]]), dim=-1)
    candidate = torch.tensor([[1.0, 0.0]])  # nearest to both; only query 0 (first arg-max) is mutual
    q_idx, c_idx = mutual_matches(query, candidate)
    assert q_idx.tolist() == [0] and c_idx.tolist() == [0]


def test_zero_padding_never_changes_a_score():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(100, 128, generator=generator)
    query = correlated_descriptors(generator, 80, base, 0.5)
    candidate = correlated_descriptors(generator, 90, base, 0.5)
    padded_query = torch.cat([query, torch.zeros(40, 128)])
    padded_candidate = torch.cat([candidate, torch.zeros(60, 128)])
    assert mutual_match_scores(query, [candidate]).item() == mutual_match_scores(padded_query, [padded_candidate]).item()


def test_empty_inputs_score_zero():
    query = F.normalize(torch.randn(5, 128), dim=-1)
    assert mutual_match_scores(query, [torch.zeros(0, 128), query]).tolist() == [0.0, 5.0]
    assert mutual_match_scores(torch.zeros(0, 128), [query]).tolist() == [0.0]
    assert mutual_match_scores(query, []).shape == (0,)


def test_mismatched_dimensions_are_rejected():
    with pytest.raises(ValueError, match=r"candidate must be \[N, 128\] local descriptors, got shape \(4, 64\)"):
        mutual_match_scores(torch.zeros(3, 128), [torch.zeros(4, 64)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(200, 128, generator=generator)
    query = correlated_descriptors(generator, 150, base, 0.4)
    candidates = [correlated_descriptors(generator, 160, base, 0.4) for _ in range(3)]
    cpu = mutual_match_scores(query, candidates)
    cuda = mutual_match_scores(query.cuda(), [c.cuda() for c in candidates])
    assert cuda.device.type == "cuda" and cuda.cpu().tolist() == cpu.tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_batched_algorithm_for_gpus_equals_the_float32_algorithm(seed):
    """Run on the CPU here (on CUDA by mutual_match_scores): near-ties, candidates of different
    lengths and an empty one, blocks of several sizes, and a threshold below 0, where a padded
    cell would count if it were not masked."""
    query, candidates = structured_set(seed)
    candidates = [*candidates[:3], torch.zeros(0, 128), *candidates[3:]]
    reference = reference_match_scores(query, candidates)
    assert reference.sum() > 0
    for block_bytes in (2**31, 5 * 600 * 600 * 4, 1):  # all at once, a few, one at a time
        assert torch.equal(batched_match_scores(query, candidates, block_bytes=block_bytes), reference)
    assert torch.equal(batched_match_scores(query, candidates, -2.0), reference_match_scores(query, candidates, -2.0))


def structured_set(seed: int, n: int = 600, candidates: int = 6):
    """A query and candidates sharing a low-rank structure, so many cells are near-ties."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(24, 128, generator=generator)
    base = F.normalize(torch.randn(n, 24, generator=generator) @ basis, dim=-1)
    query = correlated_descriptors(generator, n, base, 0.05)
    others = [correlated_descriptors(generator, n - 37 * k, base, 0.05 + 0.05 * k) for k in range(candidates)]
    return query, others


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_exact_engine_equals_the_float32_algorithm(seed):
    query, candidates = structured_set(seed)
    fast = mutual_match_scores(query, candidates)
    reference = reference_match_scores(query, candidates)
    assert fast.tolist() == reference.tolist()
    assert fast.sum() > 0


def test_exact_ties_go_to_the_first_index():
    query, (candidate, *_) = structured_set(3)
    duplicated = torch.cat([candidate[:200], candidate])  # rows 0-199 tie exactly with 200-399
    for candidates in ([duplicated], [torch.cat([query[:100], query])]):
        assert mutual_match_scores(query, candidates).tolist() == reference_match_scores(query, candidates).tolist()
    # Roles swapped: duplicated query cells claim the same candidate cell with equal values.
    assert mutual_match_scores(duplicated, [query]).tolist() == reference_match_scores(duplicated, [query]).tolist()
    _, c_idx = mutual_matches(query, duplicated)
    assert len(c_idx) > 0 and not bool(((c_idx >= 200) & (c_idx < 400)).any())  # the later copy never wins


def test_bf16_error_bound_holds():
    query, candidates = structured_set(4, n=400)
    for candidate in candidates:
        exact = candidate.double() @ query.double().T
        approximate = (candidate.bfloat16() @ query.bfloat16().T).double()
        below_one = approximate.abs() < 1
        assert (approximate - exact)[below_one].abs().max() <= bf16_error_bound(query, candidate)
        # Unnormalised rows: the bound covers every entry.
        scaled = 3 * candidate
        approximate = (scaled.bfloat16() @ query.bfloat16().T).double()
        assert (approximate - 3 * exact).abs().max() <= bf16_error_bound(query, scaled)


def test_engine_accepts_half_precision_storage():
    query, candidates = structured_set(6, n=300, candidates=2)
    half = [candidate.half() for candidate in candidates]
    expected = reference_match_scores(query, [candidate.float() for candidate in half])
    assert mutual_match_scores(query, half).tolist() == expected.tolist()


def test_gemm_value_is_torchs_float32_matmul_bit_for_bit():
    generator = torch.Generator().manual_seed(6)
    query = F.normalize(torch.randn(300, 128, generator=generator), dim=-1)
    candidate = F.normalize(torch.randn(200, 128, generator=generator), dim=-1)
    expected = (candidate @ query.T).numpy()
    values = np.array([[kernels.gemm_value(query.numpy(), j, candidate.numpy(), i) for j in range(300)] for i in range(200)])
    assert (values == expected).all()


@pytest.mark.parametrize("swapped", [False, True], ids=["column-ties", "row-ties"])
def test_float32_rounding_ties_are_decided_as_the_float32_gemm_does(swapped):
    """Candidate cells equidistant (in real arithmetic, up to 1e-8) from two query cells, one of
    which only it can match: which query cell the candidate cell's arg-max picks is decided by
    rounding, and the engine must decide as the float32 GEMM does, not as exact arithmetic
    would. With the roles swapped, the query cell's own arg-max is the near-tie."""
    generator = torch.Generator().manual_seed(0)
    groups = 400
    a, b, w, w2 = torch.linalg.qr(torch.randn(groups, 128, 4, generator=generator, dtype=torch.float64)).Q.unbind(-1)
    first, second = (a + b) / 2**0.5, (a - b) / 2**0.5  # both at cosine 0.7071 from `a`
    tied = F.normalize(a + 0.05 * w + 1e-8 * torch.randn(groups, 128, generator=generator, dtype=torch.float64), dim=-1)
    partner = F.normalize(second + 0.05 * w2, dim=-1)  # the second query cell's own match
    query, candidate = torch.cat([first, second]).float(), torch.cat([tied, partner]).float()
    if swapped:
        query, candidate = candidate, query
    float32_rule = reference_match_scores(query, [candidate])
    assert float32_rule != reference_match_scores(query.double(), [candidate.double()])  # the case occurs
    assert mutual_match_scores(query, [candidate]).tolist() == float32_rule.tolist()


def test_the_count_threshold_is_decided_by_the_float32_sum_near_it():
    """Mutual pairs whose exact cosine lies within 3e-7 of the threshold: whether each counts is
    decided by rounding, and the engine must decide as the original's float32 sum does."""
    generator = torch.Generator().manual_seed(0)
    pairs = 60
    basis = torch.linalg.qr(torch.randn(128, 128, generator=generator, dtype=torch.float64)).Q.T  # orthonormal rows
    a, b = basis[:pairs], basis[pairs : 2 * pairs]
    cosine = 0.7 + 3e-7 * (2 * torch.rand(pairs, 1, generator=generator, dtype=torch.float64) - 1)
    query, candidate = a.float(), (cosine * a + (1 - cosine**2).sqrt() * b).float()
    float32_rule = reference_match_scores(query, [candidate])
    assert float32_rule != reference_match_scores(query.double(), [candidate.double()])  # the case occurs
    assert 0 < float32_rule.item() < pairs
    assert mutual_match_scores(query, [candidate]).tolist() == float32_rule.tolist()


def test_key_below_is_the_table_search():
    """The threshold keys found from a value's exponent and mantissa are those of a binary search
    through the key table, at every bf16 value, next to each and at the special values."""
    from numba import njit

    key_below = njit(lambda x: keys._bf16_key_below(KEY_VALUES, x))
    finite = KEY_VALUES[np.isfinite(KEY_VALUES)]
    values = np.concatenate([
        np.random.default_rng(0).uniform(-2, 3, 20000), finite, np.nextafter(finite, np.inf), np.nextafter(finite, -np.inf),
        [0.0, -0.0, 1e-40, 2.0**-126, 3.4e38, 1e39, np.inf, -np.inf, np.nan],
    ])  # fmt: skip
    found = np.array([key_below(x) for x in values])
    assert (found == np.searchsorted(KEY_VALUES, values) - 1 - keys.KEY_OFFSET).all()


def test_float32_key_below_is_the_bits_of_the_float32_just_below():
    """For a float32 screen: the key found for x is a float32 below x whose successor is not."""
    from numba import njit

    key_below = njit(lambda x: keys._float32_key_below(x))
    rng = np.random.default_rng(0)
    samples = rng.uniform(0, 2, 20000)
    floats = rng.uniform(0, 2, 2000).astype(np.float32).astype(np.float64)  # exactly representable
    values = np.concatenate([samples, floats, np.nextafter(floats, np.inf), [1e-46, 2.0**-149, 1.0, 3.5e38, np.inf]])
    found = np.array([key_below(x) for x in values], dtype=np.int32)
    below, successor = found.view(np.float32).astype(np.float64), (found + 1).view(np.float32).astype(np.float64)
    assert (below < values).all() and (successor >= values).all()
    assert [key_below(x) for x in (0.0, -0.5, -np.inf)] == [-1, -1, -1]  # every negative key is -inf


def test_an_unknown_screen_product_is_refused(monkeypatch):
    from fol_plugin.host import HostSettingError

    with pytest.raises(HostSettingError, match="screen product 'int4'; choose one of bf16, fp32"):
        mutual_match_scores(torch.eye(2), [torch.eye(2)], product="int4")
    monkeypatch.setenv(PRODUCT_ENV, "fp64")
    with pytest.raises(HostSettingError, match="FOL_RERANK_PRODUCT='fp64'"):
        mutual_match_scores(torch.eye(2), [torch.eye(2)])


def test_the_mutual_check_collects_exactly_the_columns_a_block_reaches():
    """Block maxima against per-column threshold keys, tested 64 columns at once, then one by
    one: a screen reached only at equality, one reached strictly, one not at all, and the rest
    past the last whole screen; then random cases of several widths against NumPy."""
    block_max = np.zeros(200, np.int16)
    thresholds = np.full(200, keys.NO_THRESHOLD, np.int32)
    thresholds[[5, 70, 199]] = [0, -1, 0]
    reached = np.empty(200, np.int64)
    count = kernels._collect_reached(block_max, thresholds, reached)
    assert reached[:count].tolist() == [5, 70, 199]
    rng = np.random.default_rng(0)
    for m in (1, 63, 64, 65, 200):
        block_max = rng.integers(-(2**15), 2**15, m).astype(np.int16)
        thresholds = rng.integers(-(2**15), 2**15, m).astype(np.int32)
        thresholds[rng.random(m) < 0.3] = keys.NO_THRESHOLD
        count = kernels._collect_reached(block_max, thresholds, reached)
        assert reached[:count].tolist() == np.flatnonzero(block_max >= thresholds).tolist()
