"""API tokens: a signed-in client can mint, list and revoke its own tokens."""
