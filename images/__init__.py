"""Images and their record: object storage, the PNG provenance chunks, the invisible watermark
and verification. Used by the worker process and by every command that reads images back."""
