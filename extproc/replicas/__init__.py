"""Replica pools (static, Kubernetes) and picking (filters, scorers, picker)."""
