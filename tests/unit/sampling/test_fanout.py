import pyarrow as pa

from kolm_ray.sampling.fanout import choose_best, select


def s(i, text, k, passed=True):
    return {"sample_index": i, "text": text, "k": k, "passed": passed}


def test_highest_k_wins():
    assert choose_best([s(0, "a", 0.5), s(1, "b", 0.9), s(2, "c", 0.7)], "text") == 1


def test_failed_samples_are_never_chosen_and_all_failed_gives_none():
    assert choose_best([s(0, None, None), s(1, "b", 0.2)], "text") == 1
    assert choose_best([s(0, None, None), s(1, None, None)], "text") is None


def test_majority_vote_breaks_ties_between_labels():
    samples = [s(0, "sales", 1.0), s(1, "billing", 1.0), s(2, "Billing.", 1.0), s(3, "support", 0.0, passed=False)]
    assert choose_best(samples, "label") == 1


def test_majority_vote_compares_json_by_content():
    a, b = '{"x": 1, "y": 2}', '{"y": 2, "x": 1}'
    samples = [s(0, '{"x": 3, "y": 2}', 1.0), s(1, a, 1.0), s(2, b, 1.0)]
    assert choose_best(samples, "json") == 1


def test_text_ties_fall_back_to_the_first_sample():
    assert choose_best([s(0, "a", 0.8), s(1, "b", 0.8)], "text") == 0


def test_select_marks_one_per_row():
    t = pa.Table.from_pylist([
        {"id": "a", **s(0, "x", 0.1)}, {"id": "a", **s(1, "y", 0.9)},
        {"id": "b", **s(0, None, None)}, {"id": "b", **s(1, None, None)},
    ])
    assert select(t, "text").column("chosen").to_pylist() == [False, True, False, False]
