"""`python -m service.healthcheck`: exit 0 when /health/ready answers 200 (the container HEALTHCHECK).

It reads the same VAE_* settings as the service, so the probe follows VAE_PORT wherever it points.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from service.settings import get_settings

READY_PATH = "/health/ready"


def main() -> int:
    settings = get_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}{READY_PATH}", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"not ready: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
