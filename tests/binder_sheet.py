"""Binder et al. (2016) concrete nouns read straight from the bundled sheet, independently of
jaxprobe.norms, so the probe tests do not depend on the loader they could share a bug with."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

import jaxprobe

BINDER = Path(jaxprobe.__file__).parent / "norms/data/binder2016/WordSet1_Ratings.xlsx"
CONCRETE = ["artifact", "living object", "natural object"]


def concrete_rows() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the sheet's rows for the 275 concrete nouns, indexed by word; their 65 attribute ratings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # openpyxl: unknown extension in the sheet
        sheet = pd.read_excel(BINDER)
    concrete = sheet[sheet["Super Category"].isin(CONCRETE)].set_index("Word")
    return concrete, concrete.iloc[:, 4:69].replace("na", float("nan")).astype(float)
