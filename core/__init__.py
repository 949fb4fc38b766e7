"""The domain core: the generation request, job specs and states, errors and the shared
vocabulary. It imports neither torch nor SQLAlchemy nor Celery, so every role can use it."""
