"""Planning: dataset fingerprint, training plan and preprocessing guards (docs/models.md, "Planning")."""
