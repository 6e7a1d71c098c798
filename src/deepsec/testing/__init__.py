"""Test helpers for deepsec: a local Oracle wire test server, a test CA and pytest fixtures.

Submodules are imported on demand (``deepsec.testing.oracle``,
``deepsec.testing.tls``, ``deepsec.testing.pytest_plugin``); importing this
package imports none of them.
"""
