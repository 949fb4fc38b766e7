"""The generation index: SQLAlchemy models, engines and migrations, and the queries sdq asks.

Import from the submodules: `sdq.db.models` (tables), `sdq.db.session` (engines, schema
upgrades), `sdq.db.queries` (search, progress, batches, bulk submit).
"""
