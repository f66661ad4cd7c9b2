"""The edge: the Quart-Trio app, bearer-token auth, request schemas, problems, the CLI."""
