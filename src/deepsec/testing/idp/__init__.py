"""A local HTTPS identity provider for tests and demos.

:class:`LocalIdP` speaks enough OAuth 2.0 / OpenID Connect for real MSAL and
for the OCI identity-domain token endpoint, over TLS on ``127.0.0.1`` with a
throw-away CA (:class:`~deepsec.testing.tls.TestCA`):

* OpenID discovery at both paths MSAL uses:
  ``/{tenant}/v2.0/.well-known/openid-configuration`` (``authority=``) and
  ``/{tenant}/.well-known/openid-configuration`` (``oidc_authority=``), plus
  a B2C-style authority ``/{tenant}/b2c_local`` that MSAL accepts without
  instance discovery (for clients that cannot pass ``instance_discovery=False``,
  such as python-oracledb's ``azure_tokens`` plugin);
* JWKS at ``/{tenant}/discovery/v2.0/keys``;
* ``POST /{tenant}/oauth2/v2.0/token``: ``client_credentials`` (client secret
  in the form or HTTP Basic) and the on-behalf-of ``jwt-bearer`` grant, which
  verifies the user assertion's signature, issuer and expiry and returns an
  access token for the same user, with ``id_token`` and ``client_info``
  (configurable: :attr:`LocalIdP.obo_account_info`);
* ``POST /oauth2/v1/token``: an OCI IAM identity-domain style endpoint
  (HTTP Basic client auth, ``grant_type=client_credentials``);
* ``POST /v1/actions/generateScopedAccessToken``: the OCI identity data
  plane operation the OCI SDK's ``DataplaneClient`` calls (a request signed
  with an OCI API key; JSON ``scope`` and ``publicKey``; answers
  ``{"token": <JWT>}`` whose ``jwk`` claim is that public key), for
  python-oracledb's ``oci_tokens`` login plugin;
* extra certificate host names (``extra_hostnames``), so clients that only
  talk to the real cloud hosts (``login.microsoftonline.com``,
  ``auth.<region>.oraclecloud.com``) can be routed here through
  :class:`deepsec.testing.cloud.CloudProxy`; discovery requested under such
  a host name points its endpoints at that host name;
* RS256 JWTs with configurable claims and lifetime;
* a thread-safe request log (:meth:`LocalIdP.token_requests`);
* fault injection (:attr:`LocalIdP.faults`), one-shot or persistent, on the
  token endpoints (``target="any"``, ``"azure"`` or ``"oci"``) or on the
  OpenID metadata MSAL reads (``target="metadata"``: discovery and JWKS):

  - ``delay(s)``: sleep, then answer normally;
  - ``status(code, error, retry_after=...)``: an OAuth error answer;
    ``throttle(retry_after, status=503)`` is the same with a ``Retry-After``
    header (``429``/``503``, as Entra ID sends when it sheds load);
  - ``malformed_json()``, ``drop()``, ``down()``;
  - ``drip(per_byte=1.0)``: the whole answer, status line and headers
    included, one byte every ``per_byte`` seconds (``after_headers=True``:
    headers at once, then the body dripped): every single read succeeds, so
    only a deadline on the whole call ends it;
  - ``stall(s)``: status line and headers at once, then nothing for ``s``
    seconds before the body.

  A drip or stall stops when the client goes away or :meth:`LocalIdP.reset`
  / :meth:`LocalIdP.stop` is called.  :attr:`LocalIdP.reply_expires_in`
  replaces the ``expires_in`` of token answers (``NaN``, ``"3600"``...) to
  test lifetime validation while the JWT ``exp`` stays sane.

Every response carries ``Connection: close``, so a stopped provider is really
down.  Run it by hand with ``python -m deepsec.testing.idp --port 8443
--ca-file /tmp/idp-ca.pem``.

The package has one module per job; this module re-exports the public names,
so ``from deepsec.testing.idp import LocalIdP`` is the import to use:

* :mod:`.faults`: :class:`Fault`, :class:`Faults` and what a fault does to a request;
* :mod:`.base`: :class:`TokenRequest`, the addresses, client auth and request log;
* :mod:`.keys`: the signing key (JWTs, JWKS, end-user tokens);
* :mod:`.entra`: the Entra ID endpoints (discovery, JWKS, client credentials, OBO);
* :mod:`.oci`: the OCI IAM endpoints (identity domain, data plane);
* :mod:`.dev`: the development-only sign-in shortcut;
* :mod:`.server`: the HTTPS server and request handler;
* :mod:`.provider`: :class:`LocalIdP`, which composes them;
* :mod:`.cli`: the command line (``python -m deepsec.testing.idp``).
"""

from __future__ import annotations

from .base import JWT_BEARER, TokenRequest
from .cli import iter_lines, main
from .dev import DEV_TOKEN_PATH
from .faults import Fault, FaultKind, Faults, Target
from .oci import OCI_SCOPED_TOKEN_PATH
from .provider import LocalIdP

__all__ = [
    "DEV_TOKEN_PATH",
    "JWT_BEARER",
    "OCI_SCOPED_TOKEN_PATH",
    "Fault",
    "FaultKind",
    "Faults",
    "LocalIdP",
    "Target",
    "TokenRequest",
    "iter_lines",
    "main",
]
