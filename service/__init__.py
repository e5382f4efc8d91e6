"""vaeserve's HTTP service. Importing this package builds nothing: see `service.app.create_app`."""
