"""Class-conditional denoisers (DiT): the "prompts" are class names or integer labels.

Names resolve through the checkpoint's `id2label` (model_index.json) as diffusers' `DiTPipeline.get_label_ids`
does: every comma-separated synonym of a class names it ("great white shark", "white shark", ...), exactly.
An empty prompt (the default negative prompt) is the null class, the unconditional half of classifier-free
guidance.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import numpy as np

from jaxprobe.errors import InputError


def label_table(id2label: Mapping[int, str] | None) -> dict[str, int]:
    """{name: class id} with every comma-separated synonym of each class, stripped."""
    table: dict[str, int] = {}
    for key, names in (id2label or {}).items():
        for name in str(names).split(","):
            table[name.strip()] = int(key)
    return dict(sorted(table.items()))


def class_label_ids(prompts: Sequence[str | int], id2label: Mapping[int, str] | None, num_classes: int,
                    ) -> np.ndarray:
    """(n,) int32 class ids for class names, integer labels (ints or digit strings) or "" (the null class,
    `num_classes`). Unknown names raise InputError listing the closest names the checkpoint knows."""
    table = label_table(id2label)
    ids = []
    for prompt in prompts:
        if isinstance(prompt, (bool, np.bool_)):
            raise InputError(f"{prompt!r} is not a class: pass class names or integer labels")
        if isinstance(prompt, (int, np.integer)) or (isinstance(prompt, str) and prompt.strip().isdigit()):
            label = int(prompt)
            if not 0 <= label < num_classes:
                raise InputError(f"class label {label} is out of range: this model has classes 0..{num_classes - 1}")
            ids.append(label)
            continue
        name = str(prompt).strip()
        if not name:
            ids.append(num_classes)
            continue
        if name not in table:
            raise InputError(_unknown(name, table))
        ids.append(table[name])
    return np.asarray(ids, np.int32)


def _unknown(name: str, table: Mapping[str, int]) -> str:
    if not table:
        return (f"{name!r} is not a class label: this checkpoint has no id2label names (model_index.json), so pass "
                "integer class labels")
    close = difflib.get_close_matches(name, list(table), n=5, cutoff=0.6)
    lower = [n for n in table if name.lower() == n.lower()]
    close = list(dict.fromkeys(lower + close))
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        f" (it knows {len(table)} names, e.g. {', '.join(repr(n) for n in list(table)[:3])})"
    return f"{name!r} is not one of this checkpoint's class names{hint} Names match exactly; integer labels work too."
