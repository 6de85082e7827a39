"""Fixtures of the reliability suite (see docs/reliability.md).

The bounded form runs in ``scripts/test``; ``VC_RELIABILITY_LONG=1`` selects the long form
(more sandboxes, more cycles, more hypothesis examples).
"""

from __future__ import annotations

import os

from tests.integration.conftest import guest_image, vc_root

__all__ = ["LONG", "guest_image", "vc_root"]

#: The long form: ``VC_RELIABILITY_LONG=1 .venv/bin/pytest tests/reliability``.
LONG = os.environ.get("VC_RELIABILITY_LONG", "") not in ("", "0")
