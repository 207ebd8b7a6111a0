"""Optional glue to other libraries; each submodule is imported lazily by the user."""
