"""Compatibility name: the synthetic-domain evaluation now lives in :mod:`gopd_mega.eval.domains`
(one evaluation layer, gopd_mega/eval/, one set of metric names: gopd_mega.eval.metrics). Nothing
in this repository imports this module; it is kept for code outside it."""

from gopd_mega.eval.domains import (  # noqa: F401
    Checker,
    EvalResult,
    answer_probability,
    domain_metrics,
    evaluate,
    evaluate_config,
    evaluate_modes,
)
