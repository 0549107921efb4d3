"""Streamlit dashboard: reads the store only (no torch import)."""
