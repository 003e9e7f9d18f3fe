"""Arguments of adapter arithmetic, shared by ``adapter combine`` and ``convert``. Parsing only:
the methods are ``edge_lora.converters.combine``."""

from __future__ import annotations

import argparse

METHOD_HELP = (
    "how to combine (PEFT's add_weighted_adapter combination_type; default: cat). "
    "cat: the exact ΔW = Σ wᵢ·ΔWᵢ (rank Σ rᵢ); svd: the same sum truncated to --svd-rank. "
    "linear, ties, dare_linear, dare_ties, magnitude_prune combine the A and B factors separately "
    "(weights √w), as PEFT does: linear is then NOT the linear combination of the deltas (it has "
    "cross terms) unless there is one adapter; use cat for that. ties_svd, dare_*_svd, "
    "magnitude_prune_svd merge the full deltas, then SVD. Negative weights negate.")


def add_combine_args(parser: argparse.ArgumentParser) -> None:
    from edge_lora.converters.combine import METHODS, SIGN_METHODS

    parser.add_argument("--method", choices=list(METHODS), default=None, metavar="METHOD", help=METHOD_HELP +
                        f" One of: {', '.join(METHODS)}.")
    parser.add_argument("--density", type=float, default=None, metavar="D",
                        help="fraction of values kept, for ties, dare_* and magnitude_prune* (required there)")
    parser.add_argument("--majority-sign-method", choices=SIGN_METHODS, default="total",
                        help="TIES sign election: sum of values (total) or count of signs (frequency); default total")
    parser.add_argument("--svd-rank", type=int, default=None, metavar="R",
                        help="rank of the result for *svd methods (default: the largest input rank)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of DARE's random pruning (default 0: the same seed gives the same adapter)")


def combine_options(args: argparse.Namespace):  # -> CombineOptions
    from edge_lora.converters.combine import DEFAULT_METHOD, CombineOptions

    return CombineOptions(method=args.method or DEFAULT_METHOD, density=args.density,
                          majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank, seed=args.seed)
