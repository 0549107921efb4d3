"""Audit probes. Each module registers one probe."""
