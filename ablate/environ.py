"""Numbers read from ``ABLATE_*`` environment variables, each checked the same way: a value that
is not a positive, finite number is one line naming the variable and what it allows."""
from __future__ import annotations

import math
import os
from typing import Optional

from ablate.errors import AblateError


def positive_number(name: str, allowed: str) -> Optional[float]:
    """The value of ``$name`` as a positive finite float, None when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise AblateError(f"{name}: {raw!r} (allowed: {allowed})")
    return value
