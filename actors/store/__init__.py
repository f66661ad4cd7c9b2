"""Durable storage behind the actors: the store boundary and its implementations."""
