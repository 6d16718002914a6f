"""Balancing a replica set: round-robin, least-busy and cache-aware routing (README "Serving a fleet")."""
