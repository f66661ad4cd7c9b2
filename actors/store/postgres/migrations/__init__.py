"""The schema's versions, one module each: ``mNNNN_<what>.py`` with ``DESCRIPTION`` and ``SQL``.

Modules, not ``.sql`` files, so that they ship with the package without package-data
settings and so that a later version may add Python steps (``async def apply(con)``).
"""
