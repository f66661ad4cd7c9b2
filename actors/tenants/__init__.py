"""The tenants: one actor per tenant, its jobs and protocol, and the registry over them."""
