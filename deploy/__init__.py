"""Ray Serve application, config schema, CLI, HTTP (OpenAI) and gRPC front ends."""
