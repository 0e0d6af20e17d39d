"""The API's routers, one module per concern: classify, operations (health, model, metrics, page), admin."""
