"""fastkd's benchmark suite, shipped as ``fastkd.bench`` and run by ``fastkd bench``: one script
per op (``bench_<op>.py``) over one harness (``harness.py``), a plot script (``plot.py``) and
pytest-benchmark entry points (``test_bench.py``). Results: ``bench/results/<device>/``."""
