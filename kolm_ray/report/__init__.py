"""``kolm report``: the bill from logged usage. ``compute`` (pure: receipts, release history,
artifact facts and prices -> a typed ``Report``), ``load`` (reads them for an environment),
``prices`` (the user-editable price file), ``render`` (the text table and the HTML page)."""

from kolm_ray.report.compute import Report, build_report
from kolm_ray.report.load import load_report
from kolm_ray.report.prices import PriceBook, load_price_book

__all__ = ["PriceBook", "Report", "build_report", "load_price_book", "load_report"]
