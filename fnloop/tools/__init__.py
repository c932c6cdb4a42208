"""Tools that run on copies of a state and return values: the learning-rate finder."""

from fnloop.tools.lr_finder import LRFinderResult as LRFinderResult
from fnloop.tools.lr_finder import lr_find as lr_find

__all__ = ["LRFinderResult", "lr_find"]
