"""The operator API: HTTPS JSON under /api/v1 (docs/api.md)."""
