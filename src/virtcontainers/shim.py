"""Former name of the per-sandbox process; it grew into :mod:`virtcontainers.server`.

``python -m virtcontainers.shim ID ...`` still runs the sandbox server.
"""

from __future__ import annotations

from virtcontainers.server.main import main

if __name__ == "__main__":
    main()
