"""The real-data continual-learning benchmark behind ``condu-merge demo``.

scikit-learn's bundled handwritten digits as task domains (:mod:`condu_merge.demo.digits`), a
tiny open_clip CLIP pre-trained in-process, every registered strategy in the same sessions
(:func:`run_benchmark`), and the paper's metrics (:mod:`condu_merge.demo.metrics`).
``benchmarks/digits/run_digits.py`` runs it over seeds, FT and LoRA; results in docs/results.md.
"""

from .run import BenchConfig, run_benchmark, sanity_checks, summary_table

__all__ = ["BenchConfig", "run_benchmark", "sanity_checks", "summary_table"]
