"""Defenses: take a MODEL_DIR, write a new MODEL_DIR plus a record."""
