"""Jobs: prompt files, submitting, schedules, reproducing, exporting and purging, and the
queue operations judged from the database (reconcile, retry, cancel, resume). Used by the
commands; the worker process only runs what they put on the queue."""
