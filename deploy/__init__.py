"""Ray Serve application, config schema, CLI, and the gateway: HTTP (OpenAI) and gRPC APIs."""
