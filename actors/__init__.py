"""The concurrency core: tenant actors, their registry, the fleet client, the audit writer.

Nothing in this package knows about HTTP; the edge (``server``) imports it, never the
other way round.
"""
