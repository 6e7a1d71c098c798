"""A local HTTPS identity provider for tests and demos.

The command line (this docstring's first line is its ``--help`` description):
``python -m deepsec.testing.idp --port 8443 --ca-file /tmp/idp-ca.pem`` runs a
:class:`~deepsec.testing.idp.LocalIdP` until interrupted and prints its settings.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

from .provider import LocalIdP


def iter_lines(idp: LocalIdP) -> Iterator[str]:
    """Human-readable settings of a running provider (used by the CLI)."""
    yield f"local IdP listening on {idp.base_url}"
    yield f"  CA file        : {idp.ca_file}"
    yield f"  Entra authority: {idp.authority}"
    yield f"  OCI token URL  : {idp.oci_token_url}"
    yield f"  client id      : {idp.client_id}"
    yield "  end_user_sec_params (azure, on_behalf_of):"
    params = idp.azure_params("on_behalf_of")
    params["client_credential"] = "<secret: see --client-secret>"
    yield "    " + json.dumps(params)


def main(argv: list[str] | None = None) -> int:
    """``python -m deepsec.testing.idp``: run a provider until interrupted."""
    parser = argparse.ArgumentParser(
        # The package's __main__.py would otherwise name itself "__main__.py" in --help.
        prog="python -m deepsec.testing.idp",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ca-file", help="write the CA certificate (PEM) to this path")
    parser.add_argument("--tenant", default="test-tenant")
    parser.add_argument("--client-id", default="test-client")
    parser.add_argument("--client-secret", default="test-secret")
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--user", help="print a user token for this user name and continue")
    args = parser.parse_args(argv)
    idp = LocalIdP(
        tenant=args.tenant,
        clients={args.client_id: args.client_secret},
        expires_in=args.expires_in,
        host=args.host,
    ).start(args.port)
    if args.ca_file:
        idp.ca.write_ca_pem(args.ca_file)
        ca_path = Path(args.ca_file)
    else:
        ca_path = Path(idp.ca_file)
    for line in iter_lines(idp):
        print(line.replace(idp.ca_file, str(ca_path)), flush=True)
    if args.user:
        print(f"  user token for {args.user}: {idp.issue_user_token(args.user)}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        idp.stop()
    return 0
