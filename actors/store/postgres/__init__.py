"""The PostgreSQL store: replicas sharing one database (see docs/replicas.md).

``bridge`` (asyncpg on the Trio run), ``schema`` + ``migrations`` (the tables and their
versions), ``sequencer`` (one chain from many writers), ``verify`` and ``importer`` (the
chain in the database checked, and a single-node data dir moved into it).
"""
