import pytest

from kolm_ray.errors import InputError
from kolm_ray.sampling.pricing import Prices, Usage, cost_usd, load_prices, price_for


def test_cost_per_token_class_and_batch_discount():
    p = Prices(input=5, output=25, cache_write=6.25, cache_read=0.5)
    u = Usage(input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=2_000_000, cache_write_tokens=0)
    assert cost_usd(u, p) == pytest.approx(5 + 2.5 + 1.0)
    assert cost_usd(u, p, batch=True) == pytest.approx(4.25)


def test_unknown_model_needs_a_price_file():
    with pytest.raises(InputError, match="no price for teacher model 'my-model'"):
        price_for("my-model")


def test_price_file_overrides_and_validates(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"my-model": {"input": 1, "output": 2, "cache_write": 1.25, "cache_read": 0.1}}')
    assert price_for("my-model", load_prices(f)).output == 2
    f.write_text('{"my-model": {"input": 1}}')
    with pytest.raises(InputError, match="bad price entry"):
        load_prices(f)
    f.write_text('{"my-model": ')
    with pytest.raises(InputError, match="malformed JSON"):
        load_prices(f)
