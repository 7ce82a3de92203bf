"""Shipped recipes (YAML), installed as the package `fireq_configs`."""
