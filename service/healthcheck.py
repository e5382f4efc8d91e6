"""`python -m service.healthcheck [live]`: exit 0 when /health/ready (or /health/live) answers 200.

The container HEALTHCHECK, and the Kubernetes probes wherever kubelet's own cannot be used (mutual TLS).

It reads the same VAE_* settings as the service, so the probe follows VAE_PORT and TLS wherever they
point. Over TLS it asks its own process on the loopback address, so it checks readiness, not the
server's identity (the certificate names the service's public host, not 127.0.0.1). Under mutual TLS
it presents VAE_TLS_CERT as its client certificate: sign the server's certificate with a CA in
VAE_TLS_CLIENT_CA (or give the probe its own path through an exec probe with other settings).
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

from service.settings import Settings, get_settings

READY_PATH = "/health/ready"
LIVE_PATH = "/health/live"


def _context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # its own process, on loopback
    if settings.tls_client_ca is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["ready"], ["live"]):
        print("usage: python -m service.healthcheck [ready|live]", file=sys.stderr)
        return 2
    settings = get_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"{settings.scheme}://{host}:{settings.port}{LIVE_PATH if args == ['live'] else READY_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=3, context=_context(settings)) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"not ready: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
