"""mmaudit reference models: synthetic data, HF-form models with planted properties, and an HTTP server."""
