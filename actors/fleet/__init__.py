"""The fleet: the client actor in front of the fleet controller, its breaker, its drivers."""
