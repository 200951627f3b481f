"""Which ranking source ``data.source: auto`` stands for (retrieval's rule,
:func:`megatron_gr.data.sources.infer_source`, with impression CSVs added)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.sources import infer_source


def resolve_ranking_source(source: str, path: Optional[str | os.PathLike]) -> str:
    """``source`` itself, or for ``auto``: ``synthetic`` without a path; ``movielens`` for
    MovieLens ratings (a file, or a directory holding one); ``impressions`` for any other
    file (an impression CSV, whose header its reader checks).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: ``path`` is a prepared (retrieval) directory or a directory without
            MovieLens ratings.
    """
    if source != "auto":
        return source
    if path is None:
        return "synthetic"
    try:
        found = infer_source(path)
    except DataFormatError:
        if Path(path).is_file():
            return "impressions"
        raise DataFormatError(
            f"cannot tell what ranking data the directory {path} holds: expected MovieLens ratings (u.data, "
            "ratings.dat or ratings.csv) in it, or give an impression CSV file"
        ) from None
    if found == "prepared":
        raise DataFormatError(
            f"{path} is a prepared directory of retrieval sequences; the ranking model reads synthetic, MovieLens "
            "or impression CSV data"
        )
    return found
