"""Planning: choose which attention layers to remove and how to merge tokens for a target speed.

``candidate`` (what a plan is and the token counts it implies), ``cost`` (the measured cost table and
the latency prediction), ``proxy`` (the training-free accuracy proxy), ``search`` (the Pareto search),
``outputs`` (the plan files); ``python -m shrink.plan`` is the command line.
"""
from shrink.plan.candidate import Candidate, block_kinds, token_counts
from shrink.plan.outputs import write_outputs
from shrink.plan.proxy import Proxy, ProxyScore, load_calibration, removal_order
from shrink.plan.search import (
    SearchResult,
    Target,
    enumerate_candidates,
    pareto_front,
    search,
)

__all__ = ["Candidate", "Proxy", "ProxyScore", "SearchResult", "Target", "block_kinds", "enumerate_candidates",
           "load_calibration", "pareto_front", "removal_order", "search", "token_counts", "write_outputs"]
