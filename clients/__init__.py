"""Herder clients: the generated contracts, the async Client, the Worker and the herder CLI."""
