"""The HTTP routes by audience: tenant, admin, audit, operations (one blueprint each)."""
