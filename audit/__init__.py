"""mmaudit kernel: data, model adapters, probe runner, store, report and gate."""
__version__ = "0.2.0"
