"""`toolbox serve`: the HTTP inference server (FastAPI app, engine thread, schemas, metrics)."""
