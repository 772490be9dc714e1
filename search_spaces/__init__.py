"""What varies: the sweep file's `search.parameters` block -> Ray Tune domains."""
from search_spaces.space import build_param_space, build_search_alg, to_domain

__all__ = ["build_param_space", "build_search_alg", "to_domain"]
